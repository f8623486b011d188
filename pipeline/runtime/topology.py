"""The declared shape of a pipeline: its stages, the rings between them, how frames count.

A :class:`Topology` is data: which stage modules run, which rings (name, mode,
slots, item size) they read and write, which stages are heads (they start the
data path and have no data input), which rings carry feedback upstream, and
how the run's frame figures are read off rings and stage counters. The
supervisor, drain-on-finish, the report and the monitor read nothing else, so
a new branch (a second head feeding the same sink, say) is a new declaration,
not a change of generic code.

Rules checked by :meth:`Topology.validate` (``ValueError`` names the problem):

* stage and ring names are unique; every ring a stage names is declared;
* every ring has exactly one writer and at least one reader;
* at least one stage is a head; a head reads no data ring (it may read
  feedback), every other data-path stage reads at least one;
* the data path has no cycle: the only rings that lead upstream are the
  ones their writer declares in ``feedback``;
* stages off the data path (an embedded server) touch no ring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

RingModeName = Literal["latest", "queue"]
CountField = Literal["written", "read", "skipped", "dropped"]


@dataclass(frozen=True)
class RingDecl:
    """One shared-memory ring between two stages."""

    name: str
    """Logical name; stages ask for it with ``ctx.ring(name)``."""
    mode: RingModeName
    """``latest`` (latest-wins) or ``queue`` (bounded queue that drops the oldest)."""
    slots: int
    """Preallocated slots."""
    item_size: int
    """Largest item in bytes (the slot size)."""


@dataclass(frozen=True)
class Count:
    """Where one frame-accounting kind is read: a ring's counter or a stage's counter.

    Exactly one of ``ring`` and ``metric`` is set. ``ring`` reads ``field`` of
    that ring's statistics (they survive stage restarts); ``metric`` reads the
    declaring stage's own ``*_total`` counter (summed over restarts by the
    supervisor).
    """

    kind: str
    """The figure it adds to (``captured``, ``detected``, ``sent``, ``dropped`` ...)."""
    ring: str | None = None
    field: CountField = "written"
    metric: str | None = None

    def __post_init__(self) -> None:
        if (self.ring is None) == (self.metric is None):
            raise ValueError(f"count {self.kind!r}: give exactly one of ring= and metric=")


@dataclass(frozen=True)
class Latency:
    """A latency hop a stage measures, for the monitor's ``latency_ms`` figures.

    With ``quantiles`` the stage publishes ``<metric>_p50``, ``_p95`` and
    ``_p99`` gauges of its own rolling window; without, ``metric`` is one gauge
    whose per-sample values the monitor collects and takes percentiles of.
    """

    hop: str
    """The hop's name in the report and in ``posewire_latency_seconds{hop=...}``."""
    metric: str
    """Metric name (or prefix, with ``quantiles``)."""
    scale_to_ms: float = 1.0
    """Factor from the metric's unit to milliseconds (``0.001`` for microseconds)."""
    quantiles: bool = True
    end_to_end: bool = False
    """The hop the ``latency`` alert and the live table watch."""


@dataclass(frozen=True)
class StageDecl:
    """One stage: a module with ``run(ctx) -> int`` and its place in the topology."""

    name: str
    """Stage name: control identity, process title, log prefix, report key."""
    module: str
    """Module with the entry function, e.g. ``stages.encode``."""
    inputs: tuple[str, ...] = ()
    """Rings it reads (data and feedback)."""
    outputs: tuple[str, ...] = ()
    """Rings it writes, ``feedback`` rings included."""
    head: bool = False
    """Starts the data path: no data input; started once every other stage reported."""
    feedback: tuple[str, ...] = ()
    """Rings among ``outputs`` that lead upstream (acks, keyframe requests): not drained,
    not part of the data-path order."""
    on_data_path: bool = True
    """False for a stage beside the data path (an embedded server): it is stopped last
    and does not decide when the run is finished."""
    output_metric: str | None = None
    """The counter of items the stage outputs (the status line and live table)."""
    counts: tuple[Count, ...] = ()
    """What the stage contributes to the run's frame figures."""
    latency: tuple[Latency, ...] = ()
    """Latency hops it measures."""
    egress: bool = False
    """Hands packets to the network: its ``packets_sent_total``, ``bytes_sent_total``,
    ``transport_switches_total`` and ``transport_active_<kind>`` metrics are the run's
    wire figures (bytes per frame, bandwidth, transport)."""


@dataclass(frozen=True)
class Topology:
    """Stages (in declaration order) and rings; validated on construction."""

    stages: tuple[StageDecl, ...]
    rings: tuple[RingDecl, ...]
    frame_kinds: tuple[str, ...] = ()
    """The frame figures reported, in order (every one present, 0 without a source);
    empty: the kinds the stages' ``counts`` name, in declaration order."""
    _by_name: Mapping[str, StageDecl] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {s.name: s for s in self.stages})
        if not self.frame_kinds:
            kinds: list[str] = []
            for s in self.stages:
                kinds.extend(c.kind for c in s.counts if c.kind not in kinds)
            object.__setattr__(self, "frame_kinds", tuple(kinds))
        self.validate()

    # -- validation -------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first rule the declaration breaks."""
        names = [s.name for s in self.stages]
        _unique("stage", names)
        ring_names = [r.name for r in self.rings]
        _unique("ring", ring_names)
        declared = set(ring_names)
        for decl in self.rings:
            if decl.mode not in ("latest", "queue"):
                raise ValueError(
                    f"ring {decl.name}: mode must be 'latest' or 'queue', not {decl.mode!r}"
                )
            if decl.slots < 1 or decl.item_size < 1:
                raise ValueError(f"ring {decl.name}: slots and item_size must be positive")
        writers: dict[str, list[str]] = {r: [] for r in ring_names}
        readers: dict[str, list[str]] = {r: [] for r in ring_names}
        for s in self.stages:
            for r in (*s.inputs, *s.outputs):
                if r not in declared:
                    raise ValueError(f"stage {s.name}: ring {r!r} is not declared")
            for r in s.feedback:
                if r not in s.outputs:
                    raise ValueError(f"stage {s.name}: feedback ring {r!r} is not among outputs")
            if not s.on_data_path and (s.inputs or s.outputs or s.head):
                raise ValueError(f"stage {s.name}: a stage off the data path touches no ring")
            for r in s.outputs:
                writers[r].append(s.name)
            for r in s.inputs:
                readers[r].append(s.name)
            for c in s.counts:
                if c.ring is not None and c.ring not in declared:
                    raise ValueError(f"stage {s.name}: count reads undeclared ring {c.ring!r}")
        for r in ring_names:
            if len(writers[r]) != 1:
                raise ValueError(
                    f"ring {r}: needs exactly one writer, has {len(writers[r])}"
                    + (f" ({', '.join(writers[r])})" if writers[r] else "")
                )
            if not readers[r]:
                raise ValueError(f"ring {r}: nobody reads it")
        if not self.heads():
            raise ValueError("no head stage: declare at least one stage with head=True")
        for s in self.stages:
            if not s.on_data_path:
                continue
            data_in = self.data_inputs(s.name)
            if s.head and data_in:
                raise ValueError(f"stage {s.name}: a head reads no data ring ({data_in})")
            if not s.head and not data_in:
                raise ValueError(f"stage {s.name}: not a head, but reads no data ring")
        self.order()  # raises on a cycle

    # -- helpers ----------------------------------------------------------------

    def stage(self, name: str) -> StageDecl:
        """The stage called ``name`` (``KeyError`` if none)."""
        return self._by_name[name]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def ring(self, name: str) -> RingDecl:
        for r in self.rings:
            if r.name == name:
                return r
        raise KeyError(name)

    def feedback_rings(self) -> frozenset[str]:
        return frozenset(r for s in self.stages for r in s.feedback)

    def heads(self) -> tuple[str, ...]:
        """Stages that start the data path."""
        return tuple(s.name for s in self.stages if s.head and s.on_data_path)

    def data_path(self) -> tuple[str, ...]:
        """Stages on the data path, in declaration order."""
        return tuple(s.name for s in self.stages if s.on_data_path)

    def off_path(self) -> tuple[str, ...]:
        """Stages beside the data path (started with the others, stopped last)."""
        return tuple(s.name for s in self.stages if not s.on_data_path)

    def data_inputs(self, stage: str) -> tuple[str, ...]:
        """The data rings ``stage`` reads (feedback rings excluded): what must be drained
        before it is stopped."""
        fb = self.feedback_rings()
        return tuple(r for r in self.stage(stage).inputs if r not in fb)

    def writer(self, ring: str) -> str:
        """The one stage that writes ``ring``."""
        for s in self.stages:
            if ring in s.outputs:
                return s.name
        raise KeyError(ring)

    def producers(self, stage: str) -> tuple[str, ...]:
        """The stages writing the data rings ``stage`` reads."""
        return tuple(dict.fromkeys(self.writer(r) for r in self.data_inputs(stage)))

    def successors(self, stage: str) -> tuple[str, ...]:
        """The stages reading the data rings ``stage`` writes."""
        fb = self.feedback_rings()
        out = [r for r in self.stage(stage).outputs if r not in fb]
        return tuple(dict.fromkeys(s.name for s in self.stages for r in out if r in s.inputs))

    def order(self) -> tuple[str, ...]:
        """Data-path stages in topological order (heads first); the drain order.

        ``ValueError`` if the data path has a cycle (a ring leading upstream that
        its writer does not declare as feedback).
        """
        path = self.data_path()
        pending = {n: set(self.producers(n)) for n in path}
        done: list[str] = []
        while pending:
            ready = [n for n in path if n in pending and not pending[n]]
            if not ready:
                raise ValueError(
                    "the data path has a cycle through "
                    + ", ".join(sorted(pending))
                    + ": declare the upstream ring in its writer's feedback"
                )
            for n in ready:
                del pending[n]
                done.append(n)
                for deps in pending.values():
                    deps.discard(n)
        return tuple(done)

    def egress(self) -> tuple[str, ...]:
        """Stages that hand packets to the network."""
        return tuple(s.name for s in self.stages if s.egress)

    # -- figures ----------------------------------------------------------------

    def frames(
        self,
        rings: Mapping[str, Mapping[str, int]],
        counter: Mapping[str, Mapping[str, float]],
    ) -> dict[str, int]:
        """The run's frame figures from ring statistics and stage counters.

        ``rings``: ring name -> its statistics (``written``, ``skipped`` ...);
        ``counter``: stage name -> its counters summed over restarts. A ring or
        stage that is missing counts 0.
        """
        out = dict.fromkeys(self.frame_kinds, 0)
        for s in self.stages:
            for c in s.counts:
                if c.ring is not None:
                    value = float(rings.get(c.ring, {}).get(c.field, 0))
                else:
                    assert c.metric is not None
                    value = counter.get(s.name, {}).get(c.metric, 0.0)
                out[c.kind] = out.get(c.kind, 0) + int(value)
        return out

    def latency_hops(self) -> Iterable[tuple[str, Latency]]:
        """``(stage, hop)`` for every declared latency hop."""
        for s in self.stages:
            for lat in s.latency:
                yield s.name, lat


def _unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"{what} name {n!r} is declared twice")
        seen.add(n)
