"""``python -m pipeline detect PATH...``: see what the model sees.

Runs the pipeline's detector (``detect`` section of ``--config``, default:
MediaPipe Pose, full model) on images and videos, prints the landmarks
(``--json``: one JSON document) and, with ``--overlay``, draws the skeleton
over the input (``OUT.png`` for one image, ``OUT.mp4`` for a video or several
images). A missing or undecodable input is one clear message and a non-zero
exit (the CLI prints the :class:`~pipeline.errors.SourceError`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.config import load_config, parse_config

HELP = (
    "Detect poses in images or videos: print landmarks (--json) and draw the skeleton "
    "(--overlay OUT.png|OUT.mp4)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="images, videos or image directories"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--overlay",
        type=Path,
        metavar="OUT",
        help="write the skeleton over the input: OUT.png (one image) or OUT.mp4",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="pipeline YAML (its detect section is used)"
    )


def _summary_line(res: Any) -> str:
    from pipeline.model.pose import LANDMARK_NAMES

    frames = res.frames
    found = sum(1 for f in frames if f.pose.present)
    if res.kind == "image":
        pose = frames[0].pose
        if not pose.present:
            return f"{res.path}: {res.width}x{res.height}, no person"
        parts = []
        for i in (0, 11, 12, 23, 24):
            x, y, _, v = (float(c) for c in pose.image[0, i])
            parts.append(f"{LANDMARK_NAMES[i]} ({x:.3f}, {y:.3f}) vis {v:.2f}")
        people = f"{pose.num_poses} person" + ("s" if pose.num_poses > 1 else "")
        return f"{res.path}: {res.width}x{res.height}, {people}: " + "; ".join(parts)
    ms = sorted((f.pose.detect_end_ns - f.pose.detect_start_ns) / 1e6 for f in frames)
    p50 = ms[len(ms) // 2] if ms else 0.0
    return (
        f"{res.path}: {res.width}x{res.height} at {res.fps or 0:g} fps, {len(frames)} frames, "
        f"person in {found}, detection p50 {p50:.1f} ms"
    )


def _result_json(res: Any) -> dict[str, Any]:
    from pipeline.detectors.media import pose_json

    return {
        "path": str(res.path),
        "kind": res.kind,
        "width": res.width,
        "height": res.height,
        "fps": res.fps,
        "frames": [
            {
                "index": f.index,
                "t_s": round(f.t_s, 4),
                "detect_ms": round((f.pose.detect_end_ns - f.pose.detect_start_ns) / 1e6, 3),
                "poses": pose_json(f.pose),
            }
            for f in res.frames
        ],
    }


def main(args: argparse.Namespace) -> int:
    from pipeline.detectors.media import (
        IMAGE_OVERLAY_SUFFIXES,
        VIDEO_OVERLAY_SUFFIXES,
        detect_media,
    )

    cfg = (
        load_config(args.config) if args.config is not None else parse_config("", name="<defaults>")
    )
    overlay: Path | None = args.overlay
    if overlay is not None:
        suffix = overlay.suffix.lower()
        if suffix not in IMAGE_OVERLAY_SUFFIXES and suffix not in VIDEO_OVERLAY_SUFFIXES:
            known = ", ".join(sorted(IMAGE_OVERLAY_SUFFIXES | set(VIDEO_OVERLAY_SUFFIXES)))
            print(
                f"error: --overlay {overlay}: unknown format; use one of {known}", file=sys.stderr
            )
            return 2
        if not overlay.parent.exists():
            print(
                f"error: --overlay {overlay}: no such directory {overlay.parent}", file=sys.stderr
            )
            return 2

    def show(res: Any) -> None:
        if not args.json:
            print(_summary_line(res), flush=True)

    results = detect_media(cfg, args.paths, overlay=overlay, on_result=show)
    if args.json:
        doc = {
            "detector": {
                "backend": cfg.detect.backend,
                "model_complexity": getattr(cfg.detect, "model_complexity", None),
            },
            "inputs": [_result_json(r) for r in results],
        }
        json.dump(doc, sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    if overlay is not None:
        print(f"overlay written to {overlay}", file=sys.stderr if args.json else sys.stdout)
    return 0
