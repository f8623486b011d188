"""The supervisor: starts the stages, watches them, restarts them, stops them.

It follows the Erlang/OTP model:

* **one_for_one**: a stage that dies is restarted alone; the others go on,
  and the restarted stage resumes from its rings (they live in shared memory
  owned by the supervisor, not by the stage).
* **restart intensity**: more than ``max_restarts`` restarts within
  ``period_s`` seconds and the supervisor gives up: it stops every stage and
  exits with :data:`EXIT_INTENSITY` and one message naming the stage and its
  last error.
* a stage that exits 0 is **finished**, not restarted; once every producer of
  a stage finished (a head at the end of its file, say), the stage is stopped
  as soon as its input rings are drained; when every stage of the data path
  finished, the run ends with exit 0.
* a stage silent for ``heartbeat_timeout_ms`` is **hung**: SIGTERM (and
  SIGCONT, so a stopped process can act on it), SIGKILL after
  ``kill_grace_s``, then restarted like a crash.
* a stage that exits with :attr:`~pipeline.runtime.stage.ExitStatus.CONFIG` met a
  user error (a source that cannot exist): no retry, the run stops with exit 2.

The supervisor knows no stage by name: it is handed a
:class:`~pipeline.runtime.topology.Topology` that declares the stages (module,
rings, heads, feedback, stages beside the data path) and how the run's frames
are counted. The heads start once every other stage sent its first heartbeat
(or ``supervisor.startup_timeout_ms`` passed); at the end the data path is
stopped first, then the stages beside it.

The supervisor owns every shared-memory segment: it sweeps stale ones of
crashed runs at start, creates the rings, and unlinks them on every exit
path. It binds the control ROUTER socket in a private run directory
(``<base>/<run_id>/control.sock``) that an exclusive ``flock`` guards, so a
second supervisor with the same run id is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import signal
import time
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from pipeline.config import Config
from pipeline.errors import ControlError, PosewireError, RingError, SupervisorError
from pipeline.runtime import control
from pipeline.runtime.ladder import DegradationLadder
from pipeline.runtime.observer import Observer, ObserverFactory, StageState, merge_report
from pipeline.runtime.policy import TransportPolicy
from pipeline.runtime.rundir import RunDir, default_run_base
from pipeline.runtime.stage import ExitStatus, StageSpec, error_file, stage_main
from pipeline.runtime.topology import Topology

log = logging.getLogger("posewire.supervisor")

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_INTENSITY = 3


class Supervisor:
    """Runs one pipeline until it finishes, is stopped, or gives up."""

    def __init__(
        self,
        cfg: Config,
        topology: Topology,
        *,
        duration_s: float | None = None,
        report_path: Path | None = None,
        run_id: str | None = None,
        observer: ObserverFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.topology = topology
        self._observer_factory = observer
        self.duration_s = duration_s
        self.report_path = report_path
        self.run_id = run_id or cfg.supervisor.run_id or secrets.token_hex(4)
        base = cfg.supervisor.run_dir or default_run_base()
        self.run_dir = base / self.run_id
        self._run_dir = RunDir(self.run_dir, self.run_id)
        self.stages: dict[str, StageState] = {}
        self.rings: dict[str, Any] = {}
        self.exit_code: int | None = None
        self.exit_reason: str | None = None
        self.message: str | None = None
        self._restart_times: deque[float] = deque()
        self._mp = multiprocessing.get_context("spawn")
        self._zctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._poller = zmq.Poller()
        self._signal: int | None = None
        self._started = 0.0
        self._started_wall = 0.0
        self._cmd_id = 0
        self.monitor: Observer | None = None
        self._held: list[str] = []
        """The heads of the data path while they wait for the other stages (see run)."""
        self._hold_until = 0.0
        self.policy = TransportPolicy(cfg.transmit, self.command) if cfg.transmit.fallback else None
        """The transport policy (pipeline/runtime/policy.py) with a ``transmit.fallback``."""
        self.ladder = (
            DegradationLadder(cfg.transmit, self.command) if cfg.transmit.degrade.enabled else None
        )
        """The degradation ladder (pipeline/runtime/ladder.py)."""

    # -- lifecycle ------------------------------------------------------------

    def run(self) -> int:
        """Run to the end; return the process exit code."""
        self._started = time.monotonic()
        self._started_wall = time.time()
        old_handlers = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self._setup()
            log.info(
                "run %s: stages %s; run dir %s",
                self.run_id,
                ", ".join(self.stages),
                self.run_dir,
            )
            # the heads of the data path start once every other stage has sent its
            # first heartbeat (or after supervisor.startup_timeout_ms): no frame
            # waits in a ring for a consumer that is still starting
            self._held = list(self.topology.heads())
            self._hold_until = time.monotonic() + self.cfg.supervisor.startup_timeout_ms / 1000
            for name, st in self.stages.items():
                if name not in self._held:
                    self._start(st)
            self._loop()
        finally:
            self._shutdown()
            self._write_report()
            self._cleanup()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self.message:
            (log.error if self.exit_code else log.info)("%s", self.message)
        return self.exit_code if self.exit_code is not None else EXIT_OK

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def _setup(self) -> None:
        from pipeline.runtime.ring import Ring, RingMode, segment_name, sweep_stale

        self._run_dir.claim()
        swept = sweep_stale()
        if swept:
            log.info("swept %d stale segment(s) of crashed runs: %s", len(swept), ", ".join(swept))
        for decl in self.topology.stages:
            spec = self._spec(decl.name, decl.module)
            spec.rings = {
                r: segment_name(self.run_id, r) for r in dict.fromkeys(decl.inputs + decl.outputs)
            }
            self.stages[decl.name] = StageState(spec)
        for ring in self.topology.rings:
            self.rings[ring.name] = Ring.create(
                segment_name(self.run_id, ring.name),
                slot_size=ring.item_size,
                slots=ring.slots,
                mode=RingMode(ring.mode),
                run_dir=self.run_dir,
            )
        self._zctx = zmq.Context()
        self._router = self._zctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted stage reuses its identity
        self._router.bind(self.endpoint)
        self._poller.register(self._router, zmq.POLLIN)
        if self._observer_factory is not None:  # /metrics, alerts, live status, figures
            self.monitor = self._observer_factory(self.run_dir, self.run_id)
            self.monitor.start()

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'control.sock'}"

    def _spec(self, name: str, module: str) -> StageSpec:
        return StageSpec(
            name=name,
            module=module,
            config=self.cfg,
            run_id=self.run_id,
            run_dir=self.run_dir,
            control_endpoint=self.endpoint,
            supervisor_pid=os.getpid(),
        )

    def _start(self, st: StageState) -> None:
        with contextlib.suppress(FileNotFoundError):
            error_file(self.run_dir, st.spec.name).unlink()
        proc = self._mp.Process(target=stage_main, args=(st.spec,), name=f"posewire:{st.spec.name}")
        proc.start()
        st.proc = proc
        st.started_at = time.monotonic()
        st.last_seen = None
        st.metrics = {}
        st.state = "starting"
        st.term_sent_at = None
        st.killed_for = None
        st.stop_sent = False
        self._poller.register(proc.sentinel, zmq.POLLIN)
        log.debug("started %s (pid %s)", st.spec.name, proc.pid)

    # -- main loop ------------------------------------------------------------

    def _loop(self) -> None:
        assert self._router is not None
        deadline: float | None = None
        next_status = time.monotonic() + 5.0
        while self.exit_code is None:
            events = dict(self._poller.poll(50))
            if self._router in events:
                self._drain_control()
                if self.policy is not None:
                    for name, st in self.stages.items():
                        self.policy.step(name, st.metrics)
                if self.ladder is not None:
                    self.ladder.step({name: st.metrics for name, st in self.stages.items()})
            self._check_exits()
            if self.exit_code is not None:
                break
            now = time.monotonic()
            if self._held:
                self._release_head(now)
            if deadline is None and self.duration_s is not None and not self._held:
                # the duration is streaming time: counted from the start of the heads of
                # the data path, so a slow start-up (a loaded machine) does not eat it
                deadline = now + self.duration_s
            self._check_hung(now)
            self._check_drain()
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                self._finish(EXIT_OK, f"signal:{name}", f"stopped by {name}")
            elif deadline is not None and now >= deadline:
                self._finish(EXIT_OK, "duration", f"ran for {self.duration_s:g} s")
            if self.monitor is not None:  # HTTP control requests; a sample ~1/s
                for req in self.monitor.take_commands():
                    req.resolve(self.command(req.stage, req.cmd, req.args))
                if self.monitor.due(now):
                    self.monitor.observe(self.stages, self.frames(), self.ring_stats(), now)
            if now >= next_status:
                next_status = now + 5.0
                log.info("%s", self.status_line())

    def _release_head(self, now: float) -> None:
        """Start the held heads once every other stage has reported (or on timeout)."""
        waiting = [
            n
            for n, st in self.stages.items()
            if n not in self._held and st.last_seen is None and not st.done
        ]
        if waiting and now < self._hold_until:
            return
        if waiting:
            log.warning(
                "starting %s although %s sent no heartbeat yet", ", ".join(self._held), waiting
            )
        for name in self._held:
            self._start(self.stages[name])
        self._held = []

    def _finish(self, code: int, reason: str, message: str | None = None) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.exit_reason = reason
            self.message = message

    def _drain_control(self) -> None:
        assert self._router is not None
        while True:
            try:
                ident, frame = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue  # not two frames: ignore
            name = ident.decode(errors="replace")
            st = self.stages.get(name)
            if st is None:
                log.warning("control message from unknown stage %r ignored", name)
                continue
            try:
                msg = control.decode(frame)
            except ControlError as exc:
                log.warning("bad control message from %s: %s", name, exc)
                continue
            if isinstance(msg, control.Heartbeat):
                if st.proc is not None and msg.pid == st.proc.pid:
                    st.last_seen = time.monotonic()
                    st.metrics = msg.metrics
                    st.state = msg.state
            elif isinstance(msg, control.Reply):
                level = logging.DEBUG if msg.ok else logging.WARNING
                log.log(
                    level,
                    "%s replied to command %d: ok=%s %s",
                    name,
                    msg.id,
                    msg.ok,
                    msg.error or "",
                )

    def command(self, stage: str, cmd: str, args: dict[str, Any] | None = None) -> int:
        """Send a command to a stage; the reply is logged. Returns the command id."""
        assert self._router is not None
        self._cmd_id += 1
        msg = control.Command(self._cmd_id, cmd, args or {})
        with contextlib.suppress(zmq.ZMQError):
            self._router.send_multipart([stage.encode(), control.encode(msg)], zmq.NOBLOCK)
        return self._cmd_id

    def _check_exits(self) -> None:
        if any(st.proc is not None and st.proc.exitcode is not None for st in self.stages.values()):
            self._drain_control()  # the final heartbeat of an orderly exit
        for st in self.stages.values():
            proc = st.proc
            if proc is None or proc.exitcode is None:
                continue
            self._poller.unregister(proc.sentinel)
            code = proc.exitcode
            proc.close()
            st.proc = None
            self._carry_counters(st)
            err_path = error_file(self.run_dir, st.spec.name)
            with contextlib.suppress(OSError):
                st.last_error = err_path.read_text(encoding="utf-8").strip() or st.last_error
            name = st.spec.name
            if code == 0 and st.killed_for is None:
                st.done = True
                st.state = "done"
                log.info("%s finished", name)
                continue
            if code == ExitStatus.CONFIG:
                self._finish(EXIT_CONFIG_ERROR, "config_error", f"{name}: {st.last_error}")
                return
            if st.killed_for is not None:
                why = st.killed_for
                st.last_error = st.last_error or f"{why}"
            elif code < 0:
                why = f"killed by {signal.Signals(-code).name}"
                st.last_error = why if st.last_error is None else st.last_error
            else:
                why = f"exit code {code}"
            if self.exit_code is not None or self._signal is not None:
                continue
            now = time.monotonic()
            self._restart_times.append(now)
            while (
                self._restart_times and now - self._restart_times[0] > self.cfg.supervisor.period_s
            ):
                self._restart_times.popleft()
            if len(self._restart_times) > self.cfg.supervisor.max_restarts:
                self._finish(
                    EXIT_INTENSITY,
                    "restart_intensity",
                    f"giving up: stage {name} failed ({why}); {len(self._restart_times)} "
                    f"restarts within {self.cfg.supervisor.period_s:g} s exceed max_restarts="
                    f"{self.cfg.supervisor.max_restarts}; last error of {name}: "
                    f"{st.last_error or why}",
                )
                return
            st.restarts += 1
            log.warning("%s died (%s): restart #%d", name, why, st.restarts)
            self._start(st)

    @staticmethod
    def _carry_counters(st: StageState) -> None:
        """A stage process ended: bank its ``*_total`` counters (the next one starts at 0)."""
        for k, v in list(st.metrics.items()):
            if k.endswith("_total"):
                st.carried[k] = st.carried.get(k, 0.0) + v
                del st.metrics[k]

    def _check_hung(self, now: float) -> None:
        sup = self.cfg.supervisor
        for st in self.stages.values():
            proc = st.proc
            if proc is None or proc.pid is None:
                continue
            if st.term_sent_at is not None:
                if now - st.term_sent_at > sup.kill_grace_s:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                continue
            if st.last_seen is None:
                silent, limit = now - st.started_at, sup.startup_timeout_ms / 1000
            else:
                silent, limit = now - st.last_seen, sup.heartbeat_timeout_ms / 1000
            if silent > limit:
                st.hung += 1
                st.killed_for = f"hung: no heartbeat for {silent:.1f} s"
                st.last_error = st.killed_for
                log.warning("%s is %s: terminating", st.spec.name, st.killed_for)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                    os.kill(proc.pid, signal.SIGCONT)
                st.term_sent_at = now

    def _check_drain(self) -> None:
        """Stop each stage whose producers all finished once its input rings are empty."""
        topo = self.topology
        order = topo.order()
        for name in order:
            st = self.stages[name]
            producers = topo.producers(name)
            if not producers or st.done or st.stop_sent or st.proc is None:
                continue
            if not all(self.stages[p].done for p in producers):
                continue
            if all(self._pending(r) == 0 for r in topo.data_inputs(name)):
                self.command(name, "stop")
                st.stop_sent = True
        if order and all(self.stages[n].done for n in order):
            self._finish(EXIT_OK, "finished", "pipeline finished: source ended and rings drained")

    def _pending(self, ring_name: str) -> int:
        ring = self.rings.get(ring_name)
        try:
            return int(ring.statistics().occupancy) if ring is not None else 0
        except RingError:
            return 0

    # -- shutdown -------------------------------------------------------------

    def _shutdown(self) -> None:
        # The data path first, then the stages beside it (an embedded server the data
        # path publishes to: no reconnect noise).
        deadline = time.monotonic() + self.cfg.supervisor.shutdown_timeout_s
        data_path = [self.stages[n] for n in self.topology.data_path() if n in self.stages]
        self._stop_group(data_path, deadline - self.cfg.supervisor.shutdown_timeout_s / 2)
        self._stop_group(list(self.stages.values()), deadline)

    def _stop_group(self, group: list[StageState], deadline: float) -> None:
        live = [st for st in group if st.proc is not None]
        if not live:
            return
        for st in live:
            self.command(st.spec.name, "stop")
        while time.monotonic() < deadline and any(
            st.proc is not None and st.proc.exitcode is None for st in live
        ):
            if self._router is not None and self._router.poll(20, zmq.POLLIN):
                self._drain_control()
        for st in live:
            proc = st.proc
            if proc is not None and proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                    os.kill(proc.pid, signal.SIGCONT)
        grace_end = time.monotonic() + self.cfg.supervisor.kill_grace_s
        for st in live:
            proc = st.proc
            if proc is None:
                continue
            proc.join(max(0.0, grace_end - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join(2)
        self._drain_control()  # final heartbeats carry the final counters
        for st in live:
            proc = st.proc
            if proc is not None and proc.exitcode is not None:
                self._carry_counters(st)
                with contextlib.suppress(ValueError):
                    self._poller.unregister(proc.sentinel)
                proc.close()
                st.proc = None

    def _cleanup(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        for ring in self.rings.values():
            with contextlib.suppress(RingError, OSError):
                ring.close()
            with contextlib.suppress(RingError, OSError):
                ring.unlink()
        if self._router is not None:
            self._router.close(0)
        if self._zctx is not None:
            self._zctx.term()
        self._run_dir.release()

    # -- figures --------------------------------------------------------------

    def ring_stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, ring in self.rings.items():
            try:
                s = ring.statistics()
            except (RingError, OSError):
                continue
            out[name] = {
                "written": s.written,
                "read": s.read,
                "skipped": s.skipped,
                "dropped": s.dropped,
                "peak_occupancy": s.peak_occupancy,
                "slots": s.slots,
            }
        return out

    def frames(self) -> dict[str, int]:
        """The run's frame figures, as the topology declares them."""
        counters = {name: st.all_metrics() for name, st in self.stages.items()}
        return self.topology.frames(self.ring_stats(), counters)

    def status_line(self) -> str:
        f = self.frames()
        parts = [f"{k}={v}" for k, v in f.items()]
        for name, st in self.stages.items():
            fps = st.metrics.get("fps")
            if fps is not None:
                parts.append(f"{name}:{fps:.1f}fps")
        return "status " + " ".join(parts)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "exit_reason": self.exit_reason,
            "exit_code": self.exit_code,
            "message": self.message,
            "started_at": self._started_wall,
            "duration_s": round(time.monotonic() - self._started, 3),
            "frames": self.frames(),
            "rings": self.ring_stats(),
            "stages": {
                name: {
                    "restarts": st.restarts,
                    "hung": st.hung,
                    "done": st.done,
                    "last_error": st.last_error,
                    "metrics": st.all_metrics(),
                }
                for name, st in self.stages.items()
            },
        }
        if self.policy is not None:
            out["transport_policy"] = self.policy.report()
        if self.ladder is not None:
            out["degradation"] = self.ladder.report()
        if self.monitor is not None:  # figures, alerts, time series
            merge_report(out, self.monitor.report_section(self.stages, out["frames"], out["rings"]))
        return out

    def _write_report(self) -> None:
        if self.report_path is None:
            return
        try:
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.report_path.with_suffix(self.report_path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.report(), indent=2), encoding="utf-8")
            tmp.replace(self.report_path)
        except OSError as exc:
            log.error("cannot write report %s: %s", self.report_path, exc)


def run_pipeline(
    cfg: Config,
    topology: Topology,
    *,
    duration_s: float | None = None,
    report_path: Path | None = None,
    run_id: str | None = None,
    observer: ObserverFactory | None = None,
) -> int:
    """Run the stages and rings of ``topology`` with ``cfg``; return the exit code."""
    sup = Supervisor(
        cfg,
        topology,
        duration_s=duration_s,
        report_path=report_path,
        run_id=run_id,
        observer=observer,
    )
    try:
        return sup.run()
    except SupervisorError:
        raise
    except PosewireError as exc:
        raise SupervisorError(str(exc)) from exc
