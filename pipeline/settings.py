"""Plugin sections of the configuration: their base settings models and registries.

The ``source`` and ``detect`` sections of :class:`~pipeline.config.Config` are
plugin sections: their ``kind`` / ``backend`` selects a settings model
registered in :data:`SOURCES` / :data:`DETECTORS` (one module of
:mod:`pipeline.sources` / :mod:`pipeline.detectors` each, or a plugin), and
the section is validated by that model at validation time, so a plugin
registered later validates like a built-in one. Checks that need the file
system are each settings model's own :meth:`PluginSettings.file_problems`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.registry import Registry


class ConfigModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, defaults validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False)


SOURCES: Registry[Callable[..., Any]] = Registry(
    "source kind", package="pipeline.sources", entry_points="posewire.sources"
)
"""Source kinds (``source.kind``): one module of :mod:`pipeline.sources` each, or a plugin."""
DETECTORS: Registry[Callable[..., Any]] = Registry(
    "detector backend", package="pipeline.detectors", entry_points="posewire.detectors"
)
"""Detector backends (``detect.backend``): one module of :mod:`pipeline.detectors` each."""

DEFAULT_SOURCE = "auto"
DEFAULT_DETECTOR = "mediapipe"

FileProblem = tuple[str, str]
"""``(field, message)``: a problem found on the file system, reported at that field."""


def missing_path(base_dir: Path, path: Path | None, what: str) -> str | None:
    """``"<what> not found: <path>"`` when ``path`` (relative to ``base_dir``) does not exist.

    Globs (``*``, ``?``, ``[``) are not checked here: the plugin checks them when it opens.
    """
    if path is None or any(ch in str(path) for ch in "*?["):
        return None
    full = path if path.is_absolute() else base_dir / path
    return None if full.exists() else f"{what} not found: {full}"


class PluginSettings(ConfigModel):
    """Common part of a plugin's settings: a hook for checks that need the file system."""

    def file_problems(self, base_dir: Path) -> list[FileProblem]:
        """Paths that must exist but do not, as ``(field, message)``; none by default."""
        return []


class SourceSettings(PluginSettings):
    """Where the pipeline's input comes from (the capture stage).

    Every source kind subclasses this with ``kind: Literal["<key>"]`` and its own
    fields; ``produces`` says whether it yields video frames (detected by the detect
    stage) or poses (written straight to the ``poses`` ring: no detect stage).
    """

    produces: ClassVar[Literal["frames", "poses"]] = "frames"

    kind: str = Field(DEFAULT_SOURCE, description="The source kind (a registered key).")
    as_fast_as_possible: bool = Field(
        False,
        description="Do not pace files, image folders, the demo and traces to real time: read "
        "each next item as soon as the next stage has taken the last one (benchmarks, batch runs).",
    )


class FrameSourceSettings(SourceSettings):
    """Settings shared by every source of video frames."""

    fps: float | None = Field(
        None, gt=0, le=240, description="Pacing fps; default: the source's own fps (30 for demo)."
    )
    resize: (
        tuple[Annotated[int, Field(ge=16, le=7680)], Annotated[int, Field(ge=16, le=4320)]] | None
    ) = Field(None, description="Resize every frame to [width, height] before detection.")
    stall_timeout_s: float = Field(
        5.0, gt=0, le=300, description="No frame for this long: the source is reopened."
    )
    reopen_backoff_max_s: float = Field(
        10.0, gt=0, le=600, description="Cap of the exponential backoff between reopen attempts."
    )


class DetectorSettings(PluginSettings):
    """The detector (the detect stage); each backend subclasses this with ``backend``."""

    backend: str = Field(DEFAULT_DETECTOR, description="The detector backend (a registered key).")
    workers: int = Field(
        1,
        ge=1,
        le=4,
        description="Detector instances working on successive frames in parallel threads "
        "(MediaPipe releases the GIL). 2 raises throughput on 2+ cores when the source is "
        "faster than one detector; each instance tracks and smooths its own share of frames.",
    )
    world_landmarks: bool = Field(True, description="Also output world landmarks (metres).")


def _as_details(exc: ValidationError, *, skip_extra: bool = False) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    for err in exc.errors():
        if skip_extra and err["type"] == "extra_forbidden":
            continue
        out.append(_detail(err["loc"], err["msg"], err["input"], err["type"]))
    return out


def _detail(loc: tuple[Any, ...], message: str, value: Any, kind: str) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError(kind, "{message}", {"message": message}),
        loc=tuple(loc),
        input=value,
    )


def _moved_trace(data: dict[str, Any]) -> str:
    """The message for the old ``detect: {backend: trace, ...}`` form."""
    path = data.get("trace", "PATH")
    loop = "true" if data.get("trace_loop", True) else "false"
    return (
        "the trace replay is a source now: write "
        f"`source: {{kind: trace, path: {path}, loop: {loop}}}` instead of "
        "`detect: {backend: trace, trace: ..., trace_loop: ...}`"
    )


def plugin_section(
    value: Any,
    handler: ValidatorFunctionWrapHandler,
    *,
    registry: Registry[Callable[..., Any]],
    key: str,
    default: str,
    base: type[PluginSettings],
) -> Any:
    """Validate a plugin section with the settings model its ``key`` field selects.

    Errors keep their path inside the section (``source.path``, no tag segment); an
    unknown key names the known ones, and the section's other fields are still checked
    against ``base`` (the fields most kinds share) so that every problem is reported at once.
    """
    if not isinstance(value, dict):
        return handler(value)  # an already-built settings instance, or a type error
    name = value.get(key, default)
    if registry is DETECTORS and name == "trace" and name not in registry:
        raise ValidationError.from_exception_data(
            base.__name__, [_detail((key,), _moved_trace(value), name, "moved")]
        )
    if not isinstance(name, str) or name not in registry:
        known = ", ".join(repr(p.key) for p in registry)
        details = [
            _detail(
                (key,), f"unknown {registry.what} {name!r}; known: {known}", name, "unknown_plugin"
            )
        ]
        try:
            base.model_validate({k: v for k, v in value.items() if k != key})
        except ValidationError as exc:
            details += _as_details(exc, skip_extra=True)
        raise ValidationError.from_exception_data(base.__name__, details)
    settings: type[PluginSettings] = registry.get(name).settings
    return settings.model_validate({**value, key: name})
