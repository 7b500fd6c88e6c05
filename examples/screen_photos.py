"""Screen a few photographs of one subject in one request (the classic photo use case).

    python examples/screen_photos.py photos/ --server 127.0.0.1:50051 --subject-id S-17 [--fhir Patient/17]

JPEG and PNG files are sent byte for byte (one over 8 MiB is shrunk to fit); every photo is analysed.
Photos too large together for one request (a few phone photos) go as a stream of still images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from acroscreen.client import ScreeningClient, ScreenOptions
from acroscreen.client.fhir import to_fhir_observation
from acroscreen.client.sources import image_frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="an image file or a folder of JPEG/PNG images")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--subject-id", default="")
    parser.add_argument("--fhir", metavar="REFERENCE", default=None, help="print a FHIR Observation for this subject instead")
    args = parser.parse_args()

    with ScreeningClient(args.server, timeout_s=120) as client:
        # One request when the photos fit one, else a stream of still images (each analysed).
        result = client.screen_photos(image_frames(args.photos), ScreenOptions(subject_id=args.subject_id))

    if args.fhir:
        print(json.dumps(to_fhir_observation(result, args.fhir, source="images"), indent=2))
        return 0
    print(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
