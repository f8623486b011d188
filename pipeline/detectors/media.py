"""Media for ``python -m pipeline detect``: reading images and videos, drawing skeletons.

Library code (the command in :mod:`pipeline.cli.detect` prints and parses
arguments): classify the inputs, decode them, run the configured detector,
draw the skeleton over them and write an overlay image or video.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from pipeline.config import Config
from pipeline.detectors import Detector, RGBFrame, create_detector
from pipeline.errors import SourceError
from pipeline.model.pose import LANDMARK_NAMES, POSE_CONNECTIONS, PoseFrame
from pipeline.sources.file import FileSource
from pipeline.sources.images import IMAGE_SUFFIXES

VIDEO_OVERLAY_SUFFIXES: Final = {".mp4": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
IMAGE_OVERLAY_SUFFIXES: Final = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


@dataclass
class MediaFrame:
    """One frame of an input of ``python -m pipeline detect``."""

    index: int
    t_s: float
    rgb: RGBFrame


@dataclass
class MediaInput:
    """An image or a video given on the command line."""

    path: Path
    kind: str  # "image" | "video"
    fps: float | None = None


def classify_inputs(paths: Sequence[Path]) -> list[MediaInput]:
    """Check every path exists and say whether it is an image or a video.

    A directory stands for the images in it. :class:`SourceError` for a
    missing file or an empty directory, before any work is done.
    """
    out: list[MediaInput] = []
    for p in paths:
        if not p.exists():
            raise SourceError(f"no such file: {p}")
        if p.is_dir():
            images = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise SourceError(f"no images in {p}")
            out.extend(MediaInput(q, "image") for q in images)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            out.append(MediaInput(p, "image"))
        else:
            out.append(MediaInput(p, "video"))
    return out


def read_image(path: Path) -> RGBFrame:
    """An image file as RGB; :class:`SourceError` if OpenCV cannot decode it."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SourceError(f"cannot decode {path}: not an image OpenCV can read")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.uint8)


def iter_video(path: Path) -> tuple[float, Iterator[MediaFrame]]:
    """``(fps, frames)`` of a video file, as fast as it decodes."""
    src = FileSource(path)
    src.open()  # SourceError if undecodable
    fps = src.fps

    def frames() -> Iterator[MediaFrame]:
        try:
            i = 0
            while True:
                got = src.read()
                if got is None:
                    return
                yield MediaFrame(i, i / fps, got[0])
                i += 1
        finally:
            src.close()

    return fps, frames()


_POSE_COLORS: Final = ((0, 255, 0), (255, 128, 0), (0, 160, 255), (255, 0, 255))


def draw_pose(frame_rgb: RGBFrame, pose: PoseFrame, min_visibility: float = 0.5) -> RGBFrame:
    """A copy of ``frame_rgb`` with every skeleton of ``pose`` drawn over it."""
    out = np.ascontiguousarray(frame_rgb).copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 240))
    for p in range(pose.num_poses):
        color = _POSE_COLORS[p % len(_POSE_COLORS)]
        lm = pose.image[p]
        pts = [(round(float(x) * w), round(float(y) * h)) for x, y in lm[:, :2]]
        seen = [float(v) >= min_visibility for v in lm[:, 3]]
        for a, b in POSE_CONNECTIONS:
            if seen[a] and seen[b]:
                cv2.line(out, pts[a], pts[b], color, thick, cv2.LINE_AA)
        for i, pt in enumerate(pts):
            if seen[i]:
                cv2.circle(out, pt, thick + 2, (255, 255, 255), -1, cv2.LINE_AA)
                cv2.circle(out, pt, thick + 1, color, -1, cv2.LINE_AA)
    return out


def pose_json(pose: PoseFrame) -> list[dict[str, Any]]:
    """The people of ``pose`` as JSON-ready dicts (named landmarks, world in metres)."""
    people: list[dict[str, Any]] = []
    for p in range(pose.num_poses):
        landmarks = [
            {
                "name": LANDMARK_NAMES[i],
                "x": round(float(x), 5),
                "y": round(float(y), 5),
                "z": round(float(z), 5),
                "visibility": round(float(v), 4),
            }
            for i, (x, y, z, v) in enumerate(pose.image[p])
        ]
        person: dict[str, Any] = {"landmarks": landmarks}
        if pose.world is not None:
            person["world"] = [[round(float(c), 5) for c in row] for row in pose.world[p]]
        people.append(person)
    return people


class OverlayWriter:
    """Writes skeleton overlays to one image (``.png`` ...) or one video (``.mp4`` ...)."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps
        suffix = path.suffix.lower()
        if suffix not in IMAGE_OVERLAY_SUFFIXES and suffix not in VIDEO_OVERLAY_SUFFIXES:
            raise SourceError(
                f"--overlay {path}: unknown format {suffix or '(none)'}; use one of "
                + ", ".join(sorted(IMAGE_OVERLAY_SUFFIXES | set(VIDEO_OVERLAY_SUFFIXES)))
            )
        self.is_video = suffix in VIDEO_OVERLAY_SUFFIXES
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def add(self, frame_rgb: RGBFrame) -> None:
        bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
        if not self.is_video:
            if self.frames:
                raise SourceError(
                    f"--overlay {self.path}: an image holds one frame; "
                    "use a video overlay (e.g. OUT.mp4) for videos or several images"
                )
            if not cv2.imwrite(str(self.path), bgr):
                raise SourceError(f"--overlay {self.path}: cannot write the image")
            self.frames += 1
            return
        h, w = bgr.shape[:2]
        if self._writer is None:
            fourcc = cv2.VideoWriter.fourcc(*VIDEO_OVERLAY_SUFFIXES[self.path.suffix.lower()])
            self._size = (w - w % 2, h - h % 2)  # codecs want even sizes
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise SourceError(f"--overlay {self.path}: cannot open a video writer")
        assert self._size is not None
        if (w, h) != self._size:
            bgr = cv2.resize(bgr, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


@dataclass
class MediaResult:
    """Detection results for one input."""

    path: Path
    kind: str
    width: int = 0
    height: int = 0
    fps: float | None = None
    frames: list[FrameResult] = field(default_factory=list)


@dataclass
class FrameResult:
    """The poses of one frame of an input."""

    index: int
    t_s: float
    pose: PoseFrame


def detect_media(
    cfg: Config,
    paths: Sequence[Path],
    *,
    overlay: Path | None = None,
    on_result: Callable[[MediaResult], None] | None = None,
) -> list[MediaResult]:
    """Run the configured detector over images and videos (the ``detect`` command).

    Images are detected as unrelated stills; each video with tracking (a fresh
    detector per video). ``on_result(MediaResult)`` is called as each input
    completes. Raises :class:`SourceError` (missing or undecodable input,
    unusable overlay) or :class:`ConfigError` (detector).
    """
    inputs = classify_inputs(paths)
    single_image = len(inputs) == 1 and inputs[0].kind == "image"
    if (
        overlay is not None
        and overlay.suffix.lower() in IMAGE_OVERLAY_SUFFIXES
        and not single_image
    ):
        raise SourceError(
            f"--overlay {overlay}: an image overlay needs exactly one input image; "
            "use a video overlay (e.g. OUT.mp4)"
        )
    writer: OverlayWriter | None = None
    still: Detector | None = None
    results: list[MediaResult] = []
    try:
        for inp in inputs:
            if inp.kind == "image":
                rgb = read_image(inp.path)
                if still is None:
                    still = create_detector(cfg, video=False)
                res = MediaResult(inp.path, "image", rgb.shape[1], rgb.shape[0])
                frames: Iterator[MediaFrame] = iter([MediaFrame(0, 0.0, rgb)])
                detector = still
                fps = 10.0
            else:
                fps, frames = iter_video(inp.path)
                res = MediaResult(inp.path, "video", fps=fps)
                detector = create_detector(cfg, video=True)
            try:
                t0 = time.time_ns()
                for mf in frames:
                    ts = t0 + round(mf.t_s * 1e9)
                    pose = detector.detect(mf.rgb, mf.index, ts)
                    res.height, res.width = mf.rgb.shape[:2]
                    res.frames.append(FrameResult(mf.index, mf.t_s, pose))
                    if overlay is not None:
                        if writer is None:
                            writer = OverlayWriter(overlay, fps)
                        writer.add(draw_pose(mf.rgb, pose))
            finally:
                if detector is not still:
                    detector.close()
            results.append(res)
            if on_result is not None:
                on_result(res)
    finally:
        if still is not None:
            still.close()
        if writer is not None:
            writer.close()
    return results
