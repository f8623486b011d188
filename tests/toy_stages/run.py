"""``python -m tests.toy_stages.run RUN_DIR REPORT``: the toy two-branch topology under the
real supervisor (the test starts it as its own process: the supervisor owns its signals)."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.runtime.stage import setup_logging
from pipeline.runtime.supervisor import run_pipeline
from pipeline.runtime.topology import Count, RingDecl, StageDecl, Topology


def toy_topology() -> Topology:
    """video ──video──► sink ◄──audio── mic"""
    return Topology(
        stages=(
            StageDecl(
                "video",
                "tests.toy_stages.video",
                outputs=("video",),
                head=True,
                output_metric="items_total",
                counts=(
                    Count("video", ring="video"),
                    Count("dropped", ring="video", field="dropped"),
                ),
            ),
            StageDecl(
                "mic",
                "tests.toy_stages.mic",
                outputs=("audio",),
                head=True,
                output_metric="items_total",
                counts=(
                    Count("audio", ring="audio"),
                    Count("dropped", ring="audio", field="dropped"),
                ),
            ),
            StageDecl(
                "sink",
                "tests.toy_stages.sink",
                inputs=("video", "audio"),
                output_metric="items_total",
                counts=(Count("sunk", metric="items_total"),),
            ),
        ),
        rings=(RingDecl("video", "queue", 512, 8), RingDecl("audio", "queue", 512, 8)),
    )


def main(run_dir: Path, report: Path) -> int:
    setup_logging("supervisor")
    cfg = Config.model_validate(
        {
            "supervisor": {
                "run_dir": str(run_dir),
                "heartbeat_interval_ms": 100,
                "heartbeat_timeout_ms": 1500,
            },
            "monitor": {"enabled": False, "status": "off", "sample_interval_s": 0.2},
        }
    )
    return run_pipeline(cfg, toy_topology(), report_path=report)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
