"""Phantoms: identity photographs morphed towards the facial signs of acromegaly.

There are no shareable patient photographs, so the demo model is trained and
checked on *phantoms*: real faces whose 68 landmarks are moved the way the
disease moves them in a frontal view (wider nose, wider and longer lower jaw,
thicker lips, lower and heavier brow) and warped with a smooth thin-plate
spline. They are 2-D proxies with a known true level, good for validating the
pipeline, not a model of the disease.

Every image, level 1 included, goes through the same warp with a random
identity-preserving jitter, so resampling artefacts carry no level. The eye
landmarks are fixed control points: the eyes stay where they were, which also
keeps the serving path's eye-based alignment identical for all levels.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

LEVELS = (1, 2, 3)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# iBUG 300-W 68-point indices.
JAW = np.arange(0, 17)
BROWS = np.arange(17, 27)
NOSE_BRIDGE = np.arange(27, 31)
NOSE_LOWER = np.arange(31, 36)
EYES = np.arange(36, 48)
MOUTH_OUTER = np.arange(48, 60)
MOUTH_INNER = np.arange(60, 68)
UPPER_LIP_OUTER = np.array([49, 50, 51, 52, 53])
LOWER_LIP_OUTER = np.array([55, 56, 57, 58, 59])
UPPER_LIP_INNER = np.array([61, 62, 63])
LOWER_LIP_INNER = np.array([65, 66, 67])

# How strongly each jaw point takes part in widening (0 at the ears, 1 along the
# mandible) and in chin lengthening (peaks at the chin, point 8).
_JAW_WIDEN = np.array([0, 0.15, 0.35, 0.6, 0.85, 1, 1, 1, 1, 1, 1, 1, 0.85, 0.6, 0.35, 0.15, 0])
_CHIN_DOWN = np.array([0, 0, 0, 0.05, 0.15, 0.35, 0.6, 0.85, 1, 0.85, 0.6, 0.35, 0.15, 0.05, 0, 0, 0])


@dataclass(frozen=True, slots=True)
class Magnitudes:
    """One phantom's morph, each feature in face-relative units.

    nose: alar-width ratio; jaw: mandible-width ratio; chin: downward shift of the
    chin in interocular distances; lips: lip-thickness ratio; brow: downward shift
    of the brows in interocular distances.
    """

    nose: float
    jaw: float
    chin: float
    lips: float
    brow: float


@dataclass(frozen=True, slots=True)
class MagnitudeRanges:
    """Uniform (low, high) range of each Magnitudes field for one level."""

    nose: tuple[float, float]
    jaw: tuple[float, float]
    chin: tuple[float, float]
    lips: tuple[float, float]
    brow: tuple[float, float]


# Neighbouring levels overlap slightly, so no single feature decides the level;
# level 1 straddles "no change".
LEVEL_RANGES: dict[int, MagnitudeRanges] = {
    1: MagnitudeRanges(nose=(0.97, 1.06), jaw=(0.98, 1.03), chin=(-0.02, 0.04), lips=(0.94, 1.08), brow=(-0.01, 0.02)),
    2: MagnitudeRanges(nose=(1.15, 1.33), jaw=(1.05, 1.12), chin=(0.10, 0.21), lips=(1.22, 1.48), brow=(0.05, 0.095)),
    3: MagnitudeRanges(nose=(1.30, 1.55), jaw=(1.11, 1.21), chin=(0.19, 0.34), lips=(1.44, 1.85), brow=(0.09, 0.15)),
}


@dataclass(frozen=True, slots=True)
class JitterSettings:
    """Identity-preserving noise on the non-eye landmark groups, in interocular distances."""

    group_shift: float = 0.012
    group_scale: float = 0.015
    point: float = 0.004


@dataclass(frozen=True, slots=True, eq=False)
class PhantomImage:
    """A morphed BGR image with the landmarks it was morphed from and to."""

    pixels: np.ndarray
    level: int
    magnitudes: Magnitudes
    landmarks_before: np.ndarray
    landmarks_after: np.ndarray


@dataclass(frozen=True, slots=True)
class PhantomVideo:
    path: Path
    level: int
    magnitudes: Magnitudes
    frames: int
    fps: float


class NoFaceError(ValueError):
    """The photograph has no face the landmark fitter can use."""


def draw_magnitudes(level: int, rng: np.random.Generator) -> Magnitudes:
    """Each feature drawn independently from the level's range."""
    if level not in LEVEL_RANGES:
        raise ValueError(f"level must be one of {LEVELS}, not {level}")
    ranges = LEVEL_RANGES[level]
    return Magnitudes(**{
        name: float(rng.uniform(*getattr(ranges, name))) for name in Magnitudes.__dataclass_fields__
    })


class FaceLandmarks:
    """68 landmarks of the primary face (Haar box + dlib), as the serving path finds them.

    Holds the detector and the dlib model (≈ 100 MB, slow to load) for reuse.
    """

    def __init__(self) -> None:
        from ..runtime.detect import HaarFaceDetector
        from ..runtime.landmarks import LandmarkFitter

        self._detector = HaarFaceDetector()
        self._fitter = LandmarkFitter(68)

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        detection = self._detector.detect(image_bgr)
        if detection is None:
            raise NoFaceError("no face found")
        return self._fitter.fit(image_bgr, detection.box)


def interocular(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(landmarks[42:48].mean(0) - landmarks[36:42].mean(0)))


def morph_landmarks(
    landmarks: np.ndarray, magnitudes: Magnitudes, rng: np.random.Generator,
    jitter: JitterSettings = JitterSettings(),
) -> np.ndarray:
    """Target positions of the 68 landmarks; eyes unchanged, the rest jittered then morphed."""
    before = landmarks.astype(np.float64)
    iod = interocular(before)
    after = before.copy()
    for group in (JAW, BROWS, NOSE_BRIDGE, NOSE_LOWER, MOUTH_OUTER, MOUTH_INNER):
        pts = after[group]
        centre = pts.mean(0)
        scale = 1.0 + rng.normal(0.0, jitter.group_scale)
        shift = rng.normal(0.0, jitter.group_shift * iod, size=2)
        after[group] = centre + (pts - centre) * scale + shift
    non_eye = np.setdiff1d(np.arange(68), EYES)
    after[non_eye] += rng.normal(0.0, jitter.point * iod, size=(len(non_eye), 2))

    # A face-aligned frame: x along the eye line, y down the face.
    eye_l, eye_r = before[36:42].mean(0), before[42:48].mean(0)
    ex = (eye_r - eye_l) / np.linalg.norm(eye_r - eye_l)
    ey = np.array([-ex[1], ex[0]])
    mid = (eye_l + eye_r) / 2.0

    def local(p: np.ndarray) -> np.ndarray:
        return np.stack([(p - mid) @ ex, (p - mid) @ ey], axis=-1)

    def world(q: np.ndarray) -> np.ndarray:
        return mid + q[..., :1] * ex + q[..., 1:] * ey

    q = local(after)
    # Nose: alar points spread about the nose's midline.
    nose_cx = q[NOSE_LOWER, 0].mean()
    q[NOSE_LOWER, 0] = nose_cx + (q[NOSE_LOWER, 0] - nose_cx) * magnitudes.nose
    # Jaw: wider about the facial midline, chin lower; the mouth follows the mandible part way.
    face_cx = q[NOSE_BRIDGE, 0].mean()
    q[JAW, 0] = face_cx + (q[JAW, 0] - face_cx) * (1.0 + (magnitudes.jaw - 1.0) * _JAW_WIDEN)
    chin = magnitudes.chin * iod
    q[JAW, 1] += chin * _CHIN_DOWN
    q[UPPER_LIP_OUTER, 1] += 0.15 * chin
    q[[48, 54, 60, 64], 1] += 0.25 * chin
    q[UPPER_LIP_INNER, 1] += 0.25 * chin
    q[LOWER_LIP_INNER, 1] += 0.3 * chin
    q[LOWER_LIP_OUTER, 1] += 0.45 * chin
    # Lips: outer contour away from the inner one, in proportion to each lip's thickness.
    for outer, inner in ((UPPER_LIP_OUTER, UPPER_LIP_INNER), (LOWER_LIP_OUTER, LOWER_LIP_INNER)):
        inner_y = q[inner, 1].mean()
        q[outer, 1] = inner_y + (q[outer, 1] - inner_y) * magnitudes.lips
    mouth_cx = q[MOUTH_OUTER, 0].mean()
    q[[48, 54], 0] = mouth_cx + (q[[48, 54], 0] - mouth_cx) * (1.0 + 0.25 * (magnitudes.lips - 1.0))
    # Brows: lower, towards the eyes; the fixed forehead above stretches them heavier.
    q[BROWS, 1] += magnitudes.brow * iod
    after = world(q)
    after[EYES] = before[EYES]
    return after.astype(np.float32)


def _anchor_points(landmarks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fixed control points: a ring well around the face, the forehead and the image border."""
    height, width = shape
    iod = interocular(landmarks)
    centre = landmarks[[27, 30, 33, 51, 57, 8]].mean(0)
    angles = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)
    ring = centre + np.stack([np.cos(angles) * 2.1 * iod, np.sin(angles) * 2.3 * iod], axis=-1)
    eye_line = landmarks[42:48].mean(0) - landmarks[36:42].mean(0)
    up = np.array([eye_line[1], -eye_line[0]]) / np.linalg.norm(eye_line)
    forehead = landmarks[BROWS] + up * 0.6 * iod
    xs = np.linspace(0, width - 1, 9)
    ys = np.linspace(0, height - 1, 9)[1:-1]
    border = np.concatenate([
        np.stack([xs, np.zeros_like(xs)], -1), np.stack([xs, np.full_like(xs, height - 1)], -1),
        np.stack([np.zeros_like(ys), ys], -1), np.stack([np.full_like(ys, width - 1), ys], -1),
    ])
    return np.concatenate([ring, forehead, border])


def _tps_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)
    return d2 * np.log(np.maximum(d2, 1e-30))


def warp_maps(
    shape: tuple[int, int], src: np.ndarray, dst: np.ndarray, step: int = 1, regularization: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps that move the points src to dst (a thin-plate spline fitted dst → src).

    The spline is evaluated every `step` pixels and interpolated between: it is
    smooth, and this keeps large photographs cheap.
    """
    height, width = shape
    scale = max(height, width)
    p = dst.astype(np.float64) / scale
    v = (src.astype(np.float64) - dst.astype(np.float64)) / scale
    n = len(p)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _tps_kernel(p, p) + regularization * np.eye(n)
    system[:n, n] = 1.0
    system[:n, n + 1:] = p
    system[n, :n] = 1.0
    system[n + 1:, :n] = p.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = v
    coef = np.linalg.solve(system, rhs)
    gy, gx = np.mgrid[0:height + step:step, 0:width + step:step].astype(np.float64)
    grid = np.stack([gx.ravel(), gy.ravel()], -1) / scale
    disp = _tps_kernel(grid, p) @ coef[:n] + coef[n] + grid @ coef[n + 1:]
    disp = (disp * scale).reshape(gx.shape + (2,)).astype(np.float32)
    coarse_h, coarse_w = gx.shape
    full = cv2.resize(disp, (coarse_w * step, coarse_h * step), interpolation=cv2.INTER_LINEAR)
    # cv2.resize aligns pixel centres; shift so that grid node k lands on pixel k*step.
    offset = (step - 1) / 2.0
    shift = np.float32([[1, 0, -offset], [0, 1, -offset]])
    full = cv2.warpAffine(full, shift, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return xx + full[..., 0], yy + full[..., 1]


def warp_image(image: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The image with the pixels at src moved to dst; the anchors and borders stay put."""
    anchors = _anchor_points(src, image.shape[:2])
    # A grid of 1/16 interocular distance keeps the eyes (fixed, next to the moving brows) within ~1 px.
    step = max(1, int(interocular(src) // 16))
    map_x, map_y = warp_maps(image.shape[:2], np.concatenate([src, anchors]), np.concatenate([dst, anchors]), step)
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)


def make_phantom(
    image_bgr: np.ndarray, level: int, rng: np.random.Generator, landmarks: np.ndarray | None = None,
) -> PhantomImage:
    """One phantom of a photograph at a severity level (landmarks fitted when not given)."""
    before = FaceLandmarks()(image_bgr) if landmarks is None else np.asarray(landmarks, np.float32)
    magnitudes = draw_magnitudes(level, rng)
    after = morph_landmarks(before, magnitudes, rng)
    pixels = warp_image(image_bgr, before, after)
    return PhantomImage(pixels=pixels, level=level, magnitudes=magnitudes, landmarks_before=before,
                        landmarks_after=after)


def _motion(t: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth random trajectory: two sinusoids with random frequency and phase."""
    out = np.zeros_like(t)
    for _ in range(2):
        freq = rng.uniform(0.15, 0.6)
        out += amplitude / 2.0 * np.sin(2 * math.pi * freq * t + rng.uniform(0, 2 * math.pi))
    return out


def make_phantom_video(
    image_bgr: np.ndarray, level: int, path: Path, rng: np.random.Generator, *,
    frames: int = 48, fps: float = 12.0, size: tuple[int, int] = (480, 480), crf: int = 26,
    landmarks: np.ndarray | None = None, phantom: PhantomImage | None = None,
) -> PhantomVideo:
    """A short H.264 clip of one phantom with head motion, lighting drift and compression.

    ``phantom``: the still to film (made with ``rng``); default: a new one of ``image_bgr`` at ``level``.

    Motion is in-plane rotation, scale, translation and a small perspective tilt;
    the light drifts in gain, gamma and colour balance; x264 at the given CRF
    adds the compression. The same ``rng`` state gives the same bytes (with one PyAV build):
    x264 runs one thread (its frame threads depend on the core count) and without
    macroblock-tree rate control, whose vector code made different choices from run
    to run at 480 × 480 (it seems to read memory it never wrote).
    """
    import av

    if phantom is None:
        phantom = make_phantom(image_bgr, level, rng, landmarks)
    width, height = size
    src_h, src_w = phantom.pixels.shape[:2]
    base_scale = max(width / src_w, height / src_h)
    t = np.arange(frames) / fps
    rotation = _motion(t, rng, 8.0)
    zoom = 1.0 + _motion(t, rng, 0.08)
    shift_x = _motion(t, rng, 0.05 * width)
    shift_y = _motion(t, rng, 0.05 * height)
    tilt_x = _motion(t, rng, 0.0003)
    tilt_y = _motion(t, rng, 0.0003)
    gain = 1.0 + _motion(t, rng, 0.25)
    gamma = 1.0 + _motion(t, rng, 0.2)
    tint = np.stack([1.0 + _motion(t, rng, 0.06) for _ in range(3)], -1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        for i in range(frames):
            centre = (src_w / 2.0, src_h / 2.0)
            similarity = cv2.getRotationMatrix2D(centre, float(rotation[i]), float(base_scale * zoom[i]))
            similarity[0, 2] += width / 2.0 - centre[0] + shift_x[i]
            similarity[1, 2] += height / 2.0 - centre[1] + shift_y[i]
            homography = np.vstack([similarity, [tilt_x[i] / base_scale, tilt_y[i] / base_scale, 1.0]])
            frame = cv2.warpPerspective(
                phantom.pixels, homography, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101,
            )
            lit = (frame.astype(np.float32) / 255.0) ** gamma[i] * gain[i] * tint[i]
            frame = np.clip(lit * 255.0 + 0.5, 0, 255).astype(np.uint8)
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return PhantomVideo(path=path, level=level, magnitudes=phantom.magnitudes, frames=frames, fps=fps)


def holdout_identities(split_file: Path) -> set[str]:
    """Holdout identity names from SPLIT.md's table (`| n | Name | images | source |`)."""
    names = set()
    for line in Path(split_file).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\|\s*\d+\s*\|\s*([^|\s]+)\s*\|", line)
        if match:
            names.add(match.group(1))
    if not names:
        raise ValueError(f"no holdout identities found in {split_file}")
    return names


def holdout_clips(
    faces_dir: Path, folder: Path, *, people: int | None = None, photos: int | None = 1, frames: int = 16,
    seed: int = 7,
) -> Iterator[tuple[str, PhantomVideo]]:
    """(source, clip) for the holdout identities in name order, levels 1–3 each, from the first
    ``photos`` photographs of each (None: all; those without a readable face are skipped), one generator for all: the fixed clip set of the
    server-path clip checks (the slow e2e test takes the first 14 people, `scripts/holdout_clips.py`
    all of them). ``source`` is the identity, or ``identity.photo`` when several photographs are used."""
    names = sorted(holdout_identities(Path(faces_dir) / "SPLIT.md"))[:people]
    rng = np.random.default_rng(seed)
    fit_landmarks = FaceLandmarks()
    for name in names:
        for path in sorted((Path(faces_dir) / "identities" / name).glob("*.jpg"))[:photos]:
            source = name if photos == 1 else f"{name}.{path.stem}"
            image = cv2.imread(str(path))
            try:
                landmarks = fit_landmarks(image)
            except NoFaceError:  # as run_phantom does; every first photograph has a face
                print(f"skipped {path}: no readable face", file=sys.stderr, flush=True)
                continue
            for level in LEVELS:
                clip = make_phantom_video(
                    image, level, Path(folder) / f"{source}-{level}.mp4", rng, frames=frames, landmarks=landmarks,
                )
                yield source, clip


def subject_id(identity: str, level: int) -> str:
    """Phantoms of one identity at one level form one subject; `split_group` undoes the suffix."""
    return f"{identity}-L{level}"


def run_phantom(
    identities_dir: Path, out: Path, *, levels: tuple[int, ...] = LEVELS, per_image: int = 1,
    video: bool = False, split: Literal["train", "holdout", "all"] = "train",
    split_file: Path | None = None, seed: int = 0, video_frames: int = 48, video_fps: float = 12.0,
) -> Path:
    """Write OUT/<score>/<identity>-L<score>/<image>-<k>.png plus OUT/manifest.csv, which lists the PNGs.

    With ``video``, a clip of each phantom with head motion is also written beside its PNG, as
    <image>-<k>.mp4 (the same morph; the PNGs are kept).

    `split` picks identities by SPLIT.md (default: identities_dir/../SPLIT.md), so
    phantoms for training never come from holdout people. Returns the manifest path.
    """
    identities_dir, out = Path(identities_dir), Path(out)
    people = sorted(p for p in identities_dir.iterdir() if p.is_dir())
    if split != "all":
        holdout = holdout_identities(split_file or identities_dir.parent / "SPLIT.md")
        people = [p for p in people if (p.name in holdout) == (split == "holdout")]
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    fields = ["path", "score", "subject_id", "identity", "source", *Magnitudes.__dataclass_fields__]
    written = skipped = 0
    fit_landmarks = FaceLandmarks()
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for person in people:
            for source in sorted(f for f in person.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
                image = cv2.imread(str(source), cv2.IMREAD_COLOR)
                try:
                    landmarks = None if image is None else fit_landmarks(image)
                except NoFaceError:
                    landmarks = None
                if landmarks is None:
                    skipped += 1
                    print(f"skipped {source}: no readable face", file=sys.stderr, flush=True)
                    continue
                # One generator per source image: adding identities never changes the others' phantoms.
                rng = np.random.default_rng([seed, *source.relative_to(identities_dir).as_posix().encode()])
                for level in levels:
                    folder = out / str(level) / subject_id(person.name, level)
                    folder.mkdir(parents=True, exist_ok=True)
                    for k in range(per_image):
                        target = folder / f"{source.stem}-{k}.png"
                        phantom = make_phantom(image, level, rng, landmarks)
                        cv2.imwrite(str(target), phantom.pixels)
                        magnitudes = phantom.magnitudes
                        if video:  # a clip of the same morph, beside its PNG
                            make_phantom_video(image, level, target.with_suffix(".mp4"), rng, frames=video_frames,
                                               fps=video_fps, landmarks=landmarks, phantom=phantom)
                        writer.writerow({
                            "path": target.relative_to(out).as_posix(), "score": level,
                            "subject_id": subject_id(person.name, level), "identity": person.name,
                            "source": source.relative_to(identities_dir).as_posix(),
                            **{name: round(getattr(magnitudes, name), 4) for name in Magnitudes.__dataclass_fields__},
                        })
                        written += 1
            print(f"{person.name}: {written} phantoms so far", file=sys.stderr, flush=True)
    print(f"wrote {written} phantoms from {len(people)} identities to {out} ({skipped} photos skipped)", file=sys.stderr, flush=True)
    return manifest
