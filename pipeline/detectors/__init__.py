"""Detectors: pose finding in frames, one module per ``detect.backend``.

Each module declares its key, its settings model (a subclass of
:class:`~pipeline.config.DetectorSettings`) and a factory, and registers them in
:data:`~pipeline.config.DETECTORS`::

    DETECTORS.add("mediapipe", MediaPipeSettings, make)   # make(settings, base_dir, video=True)

``video=False`` asks for a detector of unrelated still images (no tracking).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from pipeline.settings import DETECTORS

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.model.pose import PoseFrame

RGBFrame = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float32]


class Detector(ABC):
    """Finds poses in one RGB frame."""

    name: ClassVar[str] = "?"

    @abstractmethod
    def detect(self, frame_rgb: RGBFrame, seq: int, capture_ts_ns: int) -> PoseFrame:
        """Poses in ``frame_rgb`` (RGB ``uint8 [h, w, 3]``); 0 poses when nobody is there.

        Sets ``detect_start_ns``/``detect_end_ns`` (wall clock).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

    def describe(self) -> str:
        """One line for the log."""
        return self.name


def create_detector(cfg: Config, *, video: bool = True) -> Detector:
    """The detector ``cfg.detect`` describes, from the registry.

    Raises :class:`~pipeline.errors.ConfigError` if it cannot be made (a model
    missing, a bad bundle). ``video=False`` treats inputs as unrelated stills.
    """
    factory = DETECTORS.get(cfg.detect.backend).factory
    made = factory(cfg.detect, cfg.base_dir, video=video)
    if not isinstance(made, Detector):
        raise TypeError(f"detector backend {cfg.detect.backend!r} made a {type(made).__name__}")
    return made
