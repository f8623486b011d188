"""``kind: trace``: a recorded pose trace replayed on its own clock: a source of poses.

A trace is an ``.npz`` file with ``image`` ``[T, 33, 4]`` (normalised x, y, z,
visibility), optionally ``world`` ``[T, 33, 3]`` (metres) and ``fps``; the CMU
traces in ``data/pose-traces`` are examples. The capture stage writes one
:class:`~pipeline.model.pose.PoseFrame` per trace frame straight into the
``poses`` ring at the trace's fps (``as_fast_as_possible``: unpaced), so the
pipeline runs without camera, frames ring, detect stage or model.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from pipeline.errors import SourceError
from pipeline.model.pose import NUM_LANDMARKS, PoseFrame
from pipeline.settings import SOURCES, FileProblem, SourceSettings, missing_path
from pipeline.sources import PoseSource, resolve

FloatArray = npt.NDArray[np.float32]

_WHERE = "source.path"


class TraceSettings(SourceSettings):
    """A pose trace ``.npz`` replayed at its own fps."""

    produces: ClassVar[Literal["frames", "poses"]] = "poses"

    kind: Literal["trace"] = "trace"
    path: Path = Field(description="Pose trace .npz to replay (see data/pose-traces).")
    loop: bool = Field(True, description="Replay the trace forever.")
    world_landmarks: bool = Field(True, description="Also output the trace's world landmarks.")

    def file_problems(self, base_dir: Path) -> list[FileProblem]:
        missing = missing_path(base_dir, self.path, "trace file")
        return [("path", missing)] if missing else []


@dataclass
class PoseTrace:
    """A pose trace loaded from an ``.npz`` file."""

    image: FloatArray
    """``[T, 33, 4]`` normalised x, y, z, visibility."""
    world: FloatArray | None
    """``[T, 33, 3]`` metres, or ``None`` when the file has none."""
    fps: float
    """Frames per second of the trace."""
    path: Path = field(default_factory=Path)

    @property
    def frames(self) -> int:
        return int(self.image.shape[0])

    @classmethod
    def load(cls, path: Path) -> PoseTrace:
        """Load and check a trace; :class:`SourceError` naming what is wrong."""
        if not path.is_file():
            raise SourceError(f"{_WHERE}: trace file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = set(data.files)
                missing = [k for k in ("image", "fps") if k not in keys]
                if missing:
                    raise SourceError(
                        f"{_WHERE}: {path} is not a pose trace: no {' or '.join(missing)} array"
                    )
                image = np.asarray(data["image"], np.float32)
                world = np.asarray(data["world"], np.float32) if "world" in keys else None
                fps = float(data["fps"])
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise SourceError(f"{_WHERE}: cannot read {path} as an .npz trace: {exc}") from exc
        if image.ndim != 3 or image.shape[1:] != (NUM_LANDMARKS, 4) or image.shape[0] == 0:
            raise SourceError(
                f"{_WHERE}: {path}: image must be [T, 33, 4] with T > 0, got {list(image.shape)}"
            )
        if world is not None and world.shape != (image.shape[0], NUM_LANDMARKS, 3):
            raise SourceError(
                f"{_WHERE}: {path}: world must be [T, 33, 3] like image, got {list(world.shape)}"
            )
        if not (math.isfinite(fps) and 0 < fps <= 1000):
            raise SourceError(f"{_WHERE}: {path}: fps must be in (0, 1000], got {fps}")
        return cls(image, world, fps, path)


class TraceSource(PoseSource):
    """Replays a :class:`PoseTrace`: pose ``n`` is trace frame ``n`` (modulo its length)."""

    kind = "trace"

    def __init__(self, trace: PoseTrace, *, loop: bool = True, world: bool = True) -> None:
        self.trace = trace
        self.loop = loop
        self.world = world

    @property
    def fps(self) -> float:
        return self.trace.fps

    def pose_at(self, index: int, seq: int, capture_ts_ns: int) -> PoseFrame:
        """The trace's frame ``index`` as a one-person :class:`PoseFrame`."""
        image = self.trace.image[index][None].copy()
        world = None
        if self.world and self.trace.world is not None:
            world = self.trace.world[index][None].copy()
        now = time.time_ns()
        return PoseFrame(seq, capture_ts_ns, image, world, now, now)

    def pose(self, n: int, seq: int, capture_ts_ns: int) -> PoseFrame | None:
        if n >= self.trace.frames and not self.loop:
            return None
        return self.pose_at(n % self.trace.frames, seq, capture_ts_ns)

    def describe(self) -> str:
        loop = ", looping" if self.loop else ""
        return (
            f"trace {self.trace.path} ({self.trace.frames} frames at {self.trace.fps:g} fps{loop})"
        )


def make(settings: TraceSettings, base_dir: Path, log: logging.Logger) -> TraceSource:
    trace = PoseTrace.load(resolve(base_dir, settings.path))
    return TraceSource(trace, loop=settings.loop, world=settings.world_landmarks)


SOURCES.add("trace", TraceSettings, make)
