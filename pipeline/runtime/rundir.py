"""The supervisor's private run directory: control socket, doorbells, error files.

``<base>/<run_id>`` is created mode 0700 and guarded by an exclusive ``flock``
on ``supervisor.lock`` (which holds the owner's pid), so a second supervisor
with the same run id is refused with a message naming the first one. It is
removed when the run ends.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import SupervisorError


def default_run_base() -> Path:
    """``$XDG_RUNTIME_DIR/posewire``, else ``<tmp>/posewire-<uid>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.access(xdg, os.W_OK):
        return Path(xdg) / "posewire"
    return Path(tempfile.gettempdir()) / f"posewire-{os.getuid()}"


class RunDir:
    """One run's directory; :meth:`claim` it, :meth:`release` it on every exit path."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Create and lock the directory; ``SupervisorError`` if it cannot or is in use."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SupervisorError(f"cannot create run directory {self.path}: {exc}") from exc
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise SupervisorError(f"run directory {self.path} is not writable")
        lock = self.path / "supervisor.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SupervisorError(f"cannot create {lock}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SupervisorError(
                f"run id {self.run_id!r} is in use by a running supervisor (pid {other}); "
                "choose another supervisor.run_id or stop that one"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Remove the directory (only if this one claimed it) and drop the lock."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None
