"""``python -m pipeline export FILE --format bvh|csv|npz``: a recording for other tools.

The recording is decoded as the receiver that made it decoded it
(:func:`pipeline.client.recording.decode`); ``t`` is the arrival time in seconds
since the recording's first record. Only the first person of a frame is exported.

* ``csv``: one row per frame and landmark: ``t, stream, seq, landmark, x, y, z,
  visibility, world_x, world_y, world_z`` (world empty when the frame has none;
  a frame without a person has no rows).
* ``npz``: per stream S: ``sS_t`` [N], ``sS_seq`` [N], ``sS_capture_ts_ns`` [N],
  ``sS_image`` [N, 33, 4], ``sS_world`` [N, 33, 3] (NaN where absent), and
  ``streams``; with one stream (or ``--stream``) also ``t``, ``seq``, ``image``,
  ``world`` without the prefix.
* ``bvh``: one stream (``--stream``, else the first with world landmarks) through
  the skeleton solver (:mod:`pipeline.client.bvh`).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.client import bvh, recording
from pipeline.errors import RecordingError
from pipeline.model.pose import NUM_LANDMARKS

HELP = "Export a recording (receive --record) as BVH (Blender), CSV or NPZ."
FORMATS = ("bvh", "csv", "npz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a recording (receive --record FILE)")
    parser.add_argument("--format", required=True, help="bvh, csv or npz")
    parser.add_argument("--stream", type=int, help="export only this stream id")
    parser.add_argument("-o", "--out", type=Path, help="output file (default: FILE.<format>)")


def stream_arrays(poses: list[recording.RecordedPose], start_ns: int) -> dict[int, dict[str, Any]]:
    """Per stream: ``t``, ``seq``, ``capture_ts_ns``, ``image``, ``world`` arrays."""
    by: dict[int, list[recording.RecordedPose]] = {}
    for p in poses:
        by.setdefault(p.stream_id, []).append(p)
    out: dict[int, dict[str, Any]] = {}
    for sid, items in sorted(by.items()):
        n = len(items)
        image = np.full((n, NUM_LANDMARKS, 4), np.nan, np.float32)
        world = np.full((n, NUM_LANDMARKS, 3), np.nan, np.float32)
        for i, p in enumerate(items):
            if p.frame.num_poses:
                image[i] = p.frame.image[0]
                if p.frame.world is not None:
                    world[i] = p.frame.world[0]
        out[sid] = {
            "t": np.array([(p.arrival_ns - start_ns) / 1e9 for p in items], np.float64),
            "seq": np.array([p.frame.seq for p in items], np.int64),
            "capture_ts_ns": np.array([p.frame.capture_ts_ns for p in items], np.int64),
            "image": image,
            "world": world,
        }
    return out


def write_csv(path: Path, arrays: dict[int, dict[str, Any]]) -> int:
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "t",
                "stream",
                "seq",
                "landmark",
                "x",
                "y",
                "z",
                "visibility",
                "world_x",
                "world_y",
                "world_z",
            ]
        )
        for sid, a in arrays.items():
            for i in range(len(a["t"])):
                img, wld = a["image"][i], a["world"][i]
                if not np.isfinite(img).all():
                    continue
                has_world = bool(np.isfinite(wld).all())
                t, seq = f"{a['t'][i]:.6f}", int(a["seq"][i])
                for k in range(NUM_LANDMARKS):
                    vals = [repr(float(v)) for v in img[k]]
                    wv = [repr(float(v)) for v in wld[k]] if has_world else ["", "", ""]
                    w.writerow([t, sid, seq, k, *vals, *wv])
                    rows += 1
    return rows


def write_npz(path: Path, arrays: dict[int, dict[str, Any]]) -> None:
    out: dict[str, Any] = {"streams": np.array(sorted(arrays), np.int64)}
    for sid, a in arrays.items():
        out.update({f"s{sid}_{k}": v for k, v in a.items()})
    if len(arrays) == 1:
        out.update(next(iter(arrays.values())))
    np.savez_compressed(path, **out)


def write_bvh(path: Path, arrays: dict[int, dict[str, Any]], stream: int | None) -> int:
    with_world = [
        sid for sid, a in arrays.items() if np.isfinite(a["world"]).all(axis=(1, 2)).any()
    ]
    if stream is None:
        if not with_world:
            raise RecordingError(
                "no stream of the recording has world landmarks (the publisher needs "
                "encode.world_landmarks: true): nothing to export as BVH"
            )
        stream = with_world[0]
    elif stream not in with_world:
        raise RecordingError(f"stream {stream} has no world landmarks: nothing to export as BVH")
    a = arrays[stream]
    vis = np.nan_to_num(a["image"][..., 3], nan=0.0)
    text = bvh.bvh_text(a["world"], bvh.frame_time(a["capture_ts_ns"]), vis)
    path.write_text(text, encoding="utf-8")
    return len(a["t"])


def main(args: argparse.Namespace) -> int:
    fmt = str(args.format).lower()
    if fmt not in FORMATS:
        raise RecordingError(f"unknown --format {args.format!r}: choose bvh, csv or npz")
    rec = recording.read(args.file)
    if rec.problem:
        print(f"warning: {args.file}: {rec.problem}")
    dec = recording.decode(rec)
    poses = dec.poses
    if args.stream is not None:
        if args.stream not in dec.streams:
            known = ", ".join(str(s) for s in sorted(dec.streams)) or "none"
            raise RecordingError(f"no stream {args.stream} in {args.file} (streams: {known})")
        poses = [p for p in poses if p.stream_id == args.stream]
    if not poses:
        raise RecordingError(f"{args.file}: the recording holds no decodable pose frame")
    arrays = stream_arrays(poses, rec.start_ns)
    out: Path = args.out or args.file.with_suffix(f".{fmt}")
    try:
        if fmt == "csv":
            rows = write_csv(out, arrays)
            print(f"wrote {rows} rows ({len(poses)} frames) to {out}")
        elif fmt == "npz":
            write_npz(out, arrays)
            print(f"wrote {len(poses)} frames of {len(arrays)} streams to {out}")
        else:
            n = write_bvh(out, arrays, args.stream)
            print(f"wrote {n} BVH frames to {out}")
    except OSError as exc:
        raise RecordingError(f"cannot write {out}: {exc.strerror}") from None
    return 0
