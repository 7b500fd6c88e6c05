"""Screen several recordings concurrently with the asyncio client and hand each subject's result
to another part of the service through a queue — here a writer of FHIR R4 Observations.

    python examples/async_to_fhir.py --server 127.0.0.1:50051 --out observations/ \
        call-17.mp4=Patient/17 call-18.mp4=Patient/18

In a cluster, dial every worker of every pod of the headless Service and place each stream on
the least busy one (`spread_over_workers=True`; docs/deployment.md, "Load balancing"):

    --server dns:///acroscreen-headless.acroscreen.svc.cluster.local:50051 --spread \
    --token-file /var/run/secrets/acroscreen/token --tls-ca ca.crt

The consumer is where a real integration would POST the Observation to its FHIR server
(`POST [base]/Observation`, Content-Type application/fhir+json) or publish it to a message bus.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from acroscreen.client import Credentials, ScreenOptions, SubjectResult
from acroscreen.client.aio import AsyncScreeningClient
from acroscreen.client.errors import AcroscreenClientError
from acroscreen.client.fhir import to_fhir_observation
from acroscreen.client.sources import video_frames

Job = tuple[Path, str]  # (video, FHIR subject reference)


async def screen_one(client: AsyncScreeningClient, video: Path, subject: str, max_frames: int, results: asyncio.Queue) -> None:
    started = datetime.now(timezone.utc)
    frames = video_frames(video)  # decoded in a worker thread by the client
    if max_frames:
        frames = itertools.islice(frames, max_frames)
    options = ScreenOptions(subject_id=video.stem, analyze_every_frame=True)
    try:
        result = await client.screen(frames, options)
    except AcroscreenClientError as error:
        print(f"{video}: {error}", file=sys.stderr)
        await results.put((video, subject, started, None))
        return
    await results.put((video, subject, started, result))


async def write_observations(results: asyncio.Queue, out: Path, count: int) -> int:
    """The consuming service: one FHIR Observation per subject result."""
    failures = 0
    for _ in range(count):
        video, subject, started, result = await results.get()
        if not isinstance(result, SubjectResult):
            failures += 1
            continue
        observation = to_fhir_observation(result, subject, effective=started, source="video")
        path = out / f"{observation['id']}.json"
        path.write_text(json.dumps(observation, indent=2))
        grade = result.predicted_score if result.predicted_score is not None else "-"
        print(f"{video.name} -> {subject}: {result.status}, grade {grade}, kind {result.model.kind if result.model else '?'}: {path}")
    return failures


async def run(args: argparse.Namespace, jobs: list[Job]) -> int:
    credentials = Credentials.from_files(tls_ca=args.tls_ca, token_file=args.token_file)
    args.out.mkdir(parents=True, exist_ok=True)
    results: asyncio.Queue = asyncio.Queue()
    async with AsyncScreeningClient(args.server, timeout_s=600, credentials=credentials,
                                    spread_over_workers=args.spread) as client:
        await client.wait_until_serving(30)
        consumer = asyncio.create_task(write_observations(results, args.out, len(jobs)))
        await asyncio.gather(*(screen_one(client, video, subject, args.max_frames, results) for video, subject in jobs))
        failures = await consumer
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", nargs="+", metavar="VIDEO=REFERENCE", help="a video and its FHIR subject, e.g. call.mp4=Patient/17")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--out", type=Path, default=Path("observations"))
    parser.add_argument("--max-frames", type=int, default=0, help="send at most this many frames of each video")
    parser.add_argument("--spread", action="store_true",
                        help="place each stream on the least busy worker of every server the target names")
    parser.add_argument("--tls-ca", default=None, help="PEM CA bundle: connect with TLS")
    parser.add_argument("--token-file", default=None, help="file holding a bearer token")
    args = parser.parse_args()
    jobs = []
    for item in args.jobs:
        video, _, subject = item.partition("=")
        jobs.append((Path(video), subject))
    return asyncio.run(run(args, jobs))


if __name__ == "__main__":
    sys.exit(main())
