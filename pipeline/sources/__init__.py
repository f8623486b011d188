"""Sources: where the pipeline's input comes from, one module per ``source.kind``.

Each module declares its key, its settings model (a subclass of
:class:`~pipeline.config.SourceSettings`) and a factory, and registers them in
:data:`~pipeline.config.SOURCES`::

    SOURCES.add("file", FileSettings, make)   # make(settings, base_dir, log) -> Source

A source of video frames is a :class:`Source` (the capture stage reads it
through a :class:`~pipeline.sources.feed.FrameFeed` and writes the ``frames``
ring); a source of poses (``produces = "poses"``, e.g. the trace replay) is a
:class:`PoseSource` (the capture stage writes its poses straight to the
``poses`` ring, and the pipeline has no detect stage).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from pipeline.settings import SOURCES

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.model.pose import PoseFrame

RGBFrame = npt.NDArray[np.uint8]
"""An RGB ``uint8 [h, w, 3]`` image."""

DEFAULT_FPS = 30.0
"""Pacing of sources that have no frame rate of their own."""


class Source(ABC):
    """A video source: ``open()``, then ``read()`` until ``None``, then ``close()``.

    ``read()`` returns ``(frame, capture_ts_ns)``: an RGB ``uint8 [h, w, 3]``
    array and ``time.time_ns()`` taken when the frame was read. ``None`` means
    the source ended (a file) or broke (a live source: the feed reopens it).
    Construction checks what can be checked without opening (paths, schemes)
    and raises :class:`~pipeline.errors.SourceError` for a source that cannot exist.
    """

    kind: ClassVar[str] = "?"
    live: ClassVar[bool] = False
    """Frames arrive at the device's own pace (camera, url); never paced by us."""
    retry_open: ClassVar[bool] = False
    """A failing first ``open()`` is retried with backoff instead of fatal (url)."""

    def __init__(self) -> None:
        self.up = False
        """True between a successful ``open()`` and ``close()``/a failed read."""

    @property
    @abstractmethod
    def fps(self) -> float:
        """The source's own frame rate (pacing for files, folders and demo)."""

    @abstractmethod
    def open(self) -> None:
        """Open the source; :class:`~pipeline.errors.SourceError` if it cannot be opened."""

    @abstractmethod
    def read(self) -> tuple[RGBFrame, int] | None:
        """The next RGB frame and its capture timestamp, or ``None`` at the end."""

    @abstractmethod
    def close(self) -> None:
        """Release the source (idempotent)."""

    def describe(self) -> str:
        """One line for the log."""
        return self.kind


class PoseSource(ABC):
    """A source of poses, replayed on its own clock at :attr:`fps`.

    ``pose(n, seq, ts)`` is the ``n``-th pose since the start (``n`` counts up
    from 0 without gaps) or ``None`` when the source has ended.
    """

    kind: ClassVar[str] = "?"

    @property
    @abstractmethod
    def fps(self) -> float:
        """Poses per second."""

    def open(self) -> None:  # noqa: B027 - optional hook
        """Load what the source needs; :class:`~pipeline.errors.SourceError` if it cannot."""

    @abstractmethod
    def pose(self, n: int, seq: int, capture_ts_ns: int) -> PoseFrame | None:
        """The ``n``-th pose, stamped ``seq`` and ``capture_ts_ns``; ``None`` at the end."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the source."""

    def describe(self) -> str:
        """One line for the log."""
        return self.kind


def make_source(cfg: Config, log: logging.Logger | None = None) -> Source | PoseSource:
    """The source ``cfg.source`` describes (not opened yet), from the registry.

    Raises :class:`~pipeline.errors.SourceError` at once for a source that cannot exist.
    """
    factory = SOURCES.get(cfg.source.kind).factory
    made = factory(cfg.source, cfg.base_dir, log or logging.getLogger("posewire.capture"))
    if not isinstance(made, Source | PoseSource):
        raise TypeError(f"source kind {cfg.source.kind!r} made a {type(made).__name__}")
    return made


def create_source(cfg: Config, log: logging.Logger | None = None) -> Source:
    """The frame :class:`Source` ``cfg.source`` describes (``auto`` logs its choice)."""
    made = make_source(cfg, log)
    if not isinstance(made, Source):
        raise TypeError(f"source kind {cfg.source.kind!r} produces poses, not frames")
    return made


def resolve(base_dir: Path, path: Path) -> Path:
    """``path`` made absolute against the configuration file's directory."""
    return path if path.is_absolute() else (base_dir / path).resolve()
