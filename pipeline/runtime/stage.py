"""Process plumbing shared by every stage, written once.

A stage is a module in ``stages/`` with one entry function
``run(ctx: StageContext) -> int``. The supervisor starts it in a fresh
process (``multiprocessing`` *spawn*: nothing is inherited but stdio), where
:func:`stage_main` does the per-process setup (title ``posewire:<stage>``,
logging with the stage name on every line, faulthandler, parent-death signal)
and then calls the entry function with a :class:`StageContext`. A stage module
may also define ``prepare() -> None``: slow set-up that must be done before the
stage counts as started (its first heartbeat), for the supervisor starts the
producers of the data path only once their consumers sent one.

Commands: the context applies ``stop``, ``pause``, ``resume`` and ``set``
(which updates :attr:`StageContext.params`) itself; every other command is
the business of the stage that registers a handler for it with
:meth:`StageContext.on`. A stage that registered none answers "stage X does
not handle command Y". A handler refuses a bad argument by raising
:class:`~pipeline.errors.CommandError`: the supervisor gets a failed reply,
the stage goes on.

The context owns a heartbeat thread with the stage's only ZeroMQ socket (a
DEALER whose identity is the stage name). It sends a heartbeat with the
stage's metrics every ``heartbeat_interval_ms`` *only while the main loop
keeps calling* :meth:`StageContext.tick` (so a wedged main loop is declared
hung by the supervisor, as is a SIGSTOPped process), receives commands and
queues them for the main thread, which applies them in ``tick()``.

Whether a stage is restarted is decided by its exit status alone
(:class:`ExitStatus`), never by the type of an exception: the entry function
returns ``ExitStatus.DONE`` when its work is finished (not restarted), or
``ctx.refuse(message)`` (``ExitStatus.CONFIG``) for a user error that a restart
cannot fix (a source that cannot exist, say: the supervisor stops the pipeline
with exit 2). An exception escaping the entry function is a crash
(``ExitStatus.CRASH``, restarted). The last error is written to
``<run_dir>/<stage>.error`` so that the supervisor can name it.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import importlib
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import CommandError, ControlError, PosewireError
from pipeline.runtime import control

_FAULT_FILE: Any = None


class ExitStatus(IntEnum):
    """A stage process's exit status: the supervisor's only input on restarting it."""

    DONE = 0
    """Finished its work (end of the source, drained): not restarted."""
    CRASH = 1
    """Failed: restarted (one_for_one), within the restart intensity."""
    CONFIG = 78
    """A user error no restart can fix (sysexits EX_CONFIG): the run stops with exit 2."""


#: exit code of a stage that met a user error it must not be restarted for
EXIT_CONFIG = ExitStatus.CONFIG

#: process title prefix of every stage: ``posewire:<stage>``
STAGE_TITLE = "posewire:"

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(stage)-9s %(levelname)-7s %(message)s"
LOG_DATEFMT = "%H:%M:%S"


class _StageFilter(logging.Filter):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "stage"):
            record.stage = self.stage
        return True


def setup_logging(stage: str, level: int = logging.INFO) -> logging.Logger:
    """One log stream (stderr) with the stage name on every line."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    handler.addFilter(_StageFilter(stage))
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(f"posewire.{stage}")


@dataclass
class StageSpec:
    """Everything a stage process needs; pickled to the child by *spawn*."""

    name: str
    """Stage name: control identity, process title, log prefix."""
    module: str
    """Module with ``run(ctx) -> int``, e.g. ``stages.capture``."""
    config: Config
    """The validated configuration."""
    run_id: str
    """Run id (ring segment prefix)."""
    run_dir: Path
    """Private run directory (control socket, error files)."""
    control_endpoint: str
    """The supervisor's ROUTER endpoint."""
    supervisor_pid: int
    """The supervisor's pid: if the parent changes, the stage exits (no orphans)."""
    rings: dict[str, str] = field(default_factory=dict)
    """Logical name of each ring the topology gives this stage (its inputs and outputs) to
    segment name."""
    params: dict[str, Any] = field(default_factory=dict)
    """Initial parameters (the supervisor may change them with ``set``)."""


class StageContext:
    """What a stage's entry function gets: config, rings, metrics, commands."""

    def __init__(self, spec: StageSpec, log: logging.Logger) -> None:
        self.spec = spec
        self.name = spec.name
        self.config = spec.config
        self.log = log
        self.run_dir = spec.run_dir
        self.metrics: dict[str, float] = {}
        """Counters and gauges, sent with every heartbeat (numbers only)."""
        self.params: dict[str, Any] = dict(spec.params)
        """Parameters set by the supervisor's ``set`` command."""
        self.stopping = False
        """An orderly stop was requested: finish the current item and return 0."""
        self.paused = False
        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {}
        self._rings: dict[str, Any] = {}
        self._inbox: queue.SimpleQueue[control.Command] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[control.Reply] = queue.SimpleQueue()
        self._last_tick = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)

    # -- used by stages -------------------------------------------------------

    def ring(self, name: str) -> Any:
        """The ring ``name`` (one the topology declares among this stage's inputs or
        outputs), attached once; ``PosewireError`` for any other name."""
        if name not in self._rings:
            from pipeline.runtime.ring import Ring

            segment = self.spec.rings.get(name)
            if segment is None:
                raise PosewireError(f"stage {self.name} has no ring named {name!r}")
            self._rings[name] = Ring.attach(segment, run_dir=self.run_dir)
        return self._rings[name]

    def on(self, cmd: str, handler: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Handle command ``cmd`` in the main thread (after the context's own handling of
        ``set``, ``pause``, ``resume``, ``stop``); ``handler`` gets the command's arguments
        and returns the reply's result (or ``None``)."""
        self._handlers[cmd] = handler

    def tick(self) -> None:
        """Prove liveness and apply queued commands; call at least every 0.5 s."""
        self._last_tick = time.monotonic()
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._outbox.put(self._apply(cmd))

    def sleep(self, seconds: float) -> None:
        """Sleep while ticking; returns early when stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping:
            self.tick()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    # -- internals ------------------------------------------------------------

    def _apply(self, cmd: control.Command) -> control.Reply:
        try:
            result: dict[str, Any] | None = None
            handler = self._handlers.get(cmd.cmd)
            if cmd.cmd in _OWN_COMMANDS:
                _OWN_COMMANDS[cmd.cmd](self, cmd.args)
            elif handler is None:
                raise CommandError(f"stage {self.name} does not handle command {cmd.cmd!r}")
            if handler is not None:
                result = handler(cmd.args)
            return control.Reply(cmd.id, True, None, result or {})
        except PosewireError as exc:
            return control.Reply(cmd.id, False, str(exc))

    def refuse(self, message: str) -> ExitStatus:
        """Record a user error that a restart cannot fix; return the status to exit with.

        Use as ``return ctx.refuse(str(exc))`` from the entry function: the message is
        logged once (no traceback) and written where the supervisor reads it.
        """
        self.log.error("%s", message)
        _write_error(error_file(self.run_dir, self.name), message)
        return ExitStatus.CONFIG

    def state(self) -> str:
        if self.stopping:
            return "stopping"
        return "paused" if self.paused else "running"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        for r in self._rings.values():
            with contextlib.suppress(PosewireError, OSError):
                r.close()
        self._rings.clear()

    def _heartbeat_loop(self) -> None:
        import zmq

        spec = self.spec
        interval = spec.config.supervisor.heartbeat_interval_ms / 1000
        hung_after = spec.config.supervisor.heartbeat_timeout_ms / 1000
        zctx = zmq.Context()
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, spec.name.encode())
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.connect(spec.control_endpoint)
        next_beat = 0.0
        try:
            while not self._closed.is_set():
                if os.getppid() != spec.supervisor_pid:
                    self.log.error("supervisor is gone: exiting (no orphans)")
                    os._exit(1)
                while True:
                    try:
                        reply = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    sock.send(control.encode(reply))
                now = time.monotonic()
                if now >= next_beat and now - self._last_tick < hung_after:
                    hb = control.Heartbeat(spec.name, os.getpid(), self.state(), dict(self.metrics))
                    with contextlib.suppress(zmq.Again):
                        sock.send(control.encode(hb), zmq.NOBLOCK)
                    next_beat = now + interval
                if sock.poll(20, zmq.POLLIN):
                    try:
                        msg = control.decode(sock.recv())
                    except ControlError as exc:
                        self.log.warning("bad control message: %s", exc)
                        continue
                    if isinstance(msg, control.Command):
                        if msg.cmd == "stop":
                            self.stopping = True  # visible at once, even mid-item
                        self._inbox.put(msg)
            # A last heartbeat, so that the supervisor has the final counters.
            hb = control.Heartbeat(spec.name, os.getpid(), "stopping", dict(self.metrics))
            with contextlib.suppress(zmq.ZMQError):
                sock.send(control.encode(hb), zmq.NOBLOCK)
        finally:
            sock.close()
            zctx.term()


def _stop(ctx: StageContext, args: dict[str, Any]) -> None:
    ctx.stopping = True


def _pause(ctx: StageContext, args: dict[str, Any]) -> None:
    ctx.paused = True


def _resume(ctx: StageContext, args: dict[str, Any]) -> None:
    ctx.paused = False


def _set(ctx: StageContext, args: dict[str, Any]) -> None:
    ctx.params.update(args)


#: the commands every stage understands (a handler registered with ``on`` runs after)
_OWN_COMMANDS: dict[str, Callable[[StageContext, dict[str, Any]], None]] = {
    "stop": _stop,
    "pause": _pause,
    "resume": _resume,
    "set": _set,
}


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGTERM us when the supervisor dies (belt to the ppid braces)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def stage_processes(supervisor_pid: int) -> dict[str, Any]:
    """Stage name -> ``psutil.Process`` of a supervisor's stages, found by process title."""
    import psutil

    out: dict[str, Any] = {}
    try:
        children = psutil.Process(supervisor_pid).children()
    except psutil.NoSuchProcess:
        return out
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if title.startswith(STAGE_TITLE):
            out[title.split()[0][len(STAGE_TITLE) :]] = child
    return out


def error_file(run_dir: Path, stage: str) -> Path:
    return run_dir / f"{stage}.error"


def stage_main(spec: StageSpec) -> None:
    """Entry point of a stage process (the target given to ``multiprocessing``)."""
    import setproctitle

    setproctitle.setproctitle(f"{STAGE_TITLE}{spec.name}")
    log = setup_logging(spec.name)
    # a dup of the real stderr: a fatal-error dump must get out even while a stage
    # has fd 2 redirected (a stage may filter a library's start-up chatter)
    global _FAULT_FILE
    _FAULT_FILE = os.fdopen(os.dup(2), "w")
    faulthandler.enable(_FAULT_FILE)
    _set_parent_death_signal()
    if os.getppid() != spec.supervisor_pid:
        os._exit(1)
    ctx = StageContext(spec, log)

    def on_term(signum: int, frame: object) -> None:
        if ctx.stopping:  # second signal: no more patience
            os._exit(1)
        ctx.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C for the group
    code: int = ExitStatus.CRASH
    err = error_file(spec.run_dir, spec.name)
    try:
        module = importlib.import_module(spec.module)
        prepare: Callable[[], None] | None = getattr(module, "prepare", None)
        if prepare is not None:
            prepare()
        entry = module.run
        if _fault(spec.name) == "slow_start":
            time.sleep(2.0)
        ctx.start()
        if _fault(spec.name) == "crash":
            raise RuntimeError(f"injected fault: {spec.name} crashes at start (POSEWIRE_FAULT)")
        code = int(entry(ctx))
    except PosewireError as exc:  # a crash the stage could name: no traceback, restarted
        log.error("%s", exc)
        _write_error(err, f"{type(exc).__name__}: {exc}")
        code = ExitStatus.CRASH
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else ExitStatus.CRASH
    except BaseException as exc:  # noqa: BLE001 - a crash: logged with traceback, then restarted
        log.error("crashed:\n%s", traceback.format_exc())
        _write_error(err, f"{type(exc).__name__}: {exc}")
        code = ExitStatus.CRASH
    finally:
        ctx.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _fault(stage: str) -> str:
    """Fault injection for supervision tests: ``POSEWIRE_FAULT=<stage>:<kind>``.

    ``crash`` makes that stage raise at start, every time it is started (the way
    to show the restart intensity at work on a real pipeline); ``slow_start``
    delays its first heartbeat by 2 s (a consumer that is slow to start).
    """
    target, _, kind = os.environ.get("POSEWIRE_FAULT", "").partition(":")
    return kind if target == stage else ""


def _write_error(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(text[:2000], encoding="utf-8")
