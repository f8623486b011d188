"""bench/codec: bytes, error and speed of the pose codec against the usual encodings.

For every clip in ``data/pose-traces`` (override the directory with
``POSEWIRE_TRACES``) and every ``--trace FILE.npz``, with detector-like noise
(Gaussian, sigma ``--noise`` on x and y, default 0.002, and 0.01 on z, seeded)
and without, one pose per frame at the trace's 30 fps, capture timestamps with
0.5 ms of seeded jitter:

* ``posewire``: :mod:`pipeline.codec` with its default configuration (every
  frame predicted from the previous one, a keyframe every 30 frames), bytes per
  frame *including the header*, maximum x/y error in pixels at 1920 px, encode
  and decode microseconds per frame;
* baselines in the same run: MediaPipe-style JSON dicts, msgpack (single-precision
  floats), raw float32 (528 bytes), float32 + zlib, 16-bit quantization + lz4.

Then loss: the noisy streams through seeded random loss (5 % and 20 %, or
``--loss P``), in three feedback modes: ``acks`` (the receiver's
:meth:`Decoder.ack_for` feedback reaches the encoder ``--rtt`` frames later,
default 3), ``acks+kf`` (the same, but a request is answered with a full
keyframe) and ``none`` (no feedback at all, keyframes only). Reported: the
largest distance, in frames, from a lost packet to a later undecodable one
(targets: at most one round trip with acks, one keyframe interval without),
and the maximum error of every pose that was decoded.

Reference modes (``CodecConfig.references``): bytes per frame of ``previous``
(every delta predicts from the previous packet, the default) against ``keyframe``
(every delta predicts from the latest keyframe, for the lossy WebRTC pose
channel) with keyframe intervals 30 and 15, and the fraction of frames decoded
when the same seeded loss hits the delta packets only (keyframes travel
reliably), without feedback (an SFU forwards one stream to many subscribers),
plus ``previous`` with acks for comparison.

Two legs (:mod:`bench.codec_loss`): the same seeded loss on the publisher -> server
leg, on each of three server -> subscriber legs, or on both, with the packets a
mode needs delivered travelling reliably (SCTP, or repaired on NACK) and the others
lossy: decoded fraction, fraction decoded without waiting, and the waits, for
``previous``, ``keyframe`` and ``anchor`` references.

Run: ``python -m bench codec [--trace FILE.npz] [--noise SIGMA] [--loss P] [--json]``
(``python -m bench.codec`` too). ``--fit`` refits the predictor coefficients on
the traces and prints them with their leave-one-clip-out cost instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.codec_loss import two_leg_rows, two_leg_targets
from bench.common import (
    add_json_flag,
    at_least,
    at_most,
    machine_info,
    markdown_table,
    report,
    targets_table,
)
from bench.common import percentile as pct
from pipeline.codec import (
    CodecConfig,
    Decoded,
    Decoder,
    Encoder,
    Feedback,
    NeedKeyframe,
    peek_header,
)
from pipeline.config import traces_dir
from pipeline.model.pose import LANDMARK_NAMES, PoseFrame

F32 = npt.NDArray[np.float32]
REF_WIDTH = 1920
PRECISION_PX = 0.5
TS0 = 1_760_000_000_000_000_000


@dataclass
class Clip:
    name: str
    image: F32
    world: F32
    fps: float


def load_clip(path: Path) -> Clip:
    with np.load(path) as d:
        fps = float(d["fps"]) if "fps" in d else 30.0
        world = d["world"] if "world" in d else np.zeros((len(d["image"]), 33, 3), np.float32)
        return Clip(path.stem, d["image"].astype(np.float32), world.astype(np.float32), fps)


def noisy(clip: Clip, sigma: float, seed: int = 0) -> Clip:
    """The README's detector noise: sigma on x and y, 0.01 on z (clipped to the ranges)."""
    if sigma <= 0:
        return clip
    rng = np.random.default_rng(seed)
    img = clip.image.copy()
    img[..., :2] += rng.normal(0.0, sigma, img[..., :2].shape).astype(np.float32)
    img[..., 2] += rng.normal(0.0, 0.01, img[..., 2].shape).astype(np.float32)
    np.clip(img[..., :2], -1.0, 2.0, out=img[..., :2])
    return Clip(clip.name, img, clip.world, clip.fps)


def frames_of(clip: Clip, seed: int = 1) -> list[PoseFrame]:
    rng = np.random.default_rng(seed)
    step = 1e9 / clip.fps
    jitter = rng.normal(0.0, 500_000.0, len(clip.image))
    return [
        PoseFrame(
            i,
            TS0 + round(i * step + jitter[i]),
            clip.image[i : i + 1],
            clip.world[i : i + 1],
        )
        for i in range(len(clip.image))
    ]


def max_err_px(decoded: F32, original: F32) -> float:
    return float(np.abs(decoded[..., :2] - original[..., :2]).max()) * REF_WIDTH


# --------------------------------------------------------------------------- baselines


def _json_enc(f: PoseFrame) -> bytes:
    poses = [
        {
            "landmarks": [
                {"name": LANDMARK_NAMES[j], "x": x, "y": y, "z": z, "visibility": v}
                for j, (x, y, z, v) in enumerate(pose.tolist())
            ]
        }
        for pose in f.image
    ]
    return json.dumps({"seq": f.seq, "timestamp_ns": f.capture_ts_ns, "poses": poses}).encode()


def _json_dec(b: bytes) -> F32:
    obj = json.loads(b)
    return np.array(
        [
            [[lm["x"], lm["y"], lm["z"], lm["visibility"]] for lm in p["landmarks"]]
            for p in obj["poses"]
        ],
        np.float32,
    )


def _msgpack_enc(f: PoseFrame) -> bytes:
    import msgpack

    out: bytes = msgpack.packb(
        {"seq": f.seq, "ts": f.capture_ts_ns, "poses": [p.ravel().tolist() for p in f.image]},
        use_single_float=True,
    )
    return out


def _msgpack_dec(b: bytes) -> F32:
    import msgpack

    obj = msgpack.unpackb(b)
    return np.array(obj["poses"], np.float32).reshape(-1, 33, 4)


def _raw_enc(f: PoseFrame) -> bytes:
    return f.image.astype("<f4").tobytes()


def _raw_dec(b: bytes) -> F32:
    return np.frombuffer(b, "<f4").reshape(-1, 33, 4)


def _zlib_enc(f: PoseFrame) -> bytes:
    return zlib.compress(f.image.astype("<f4").tobytes(), 6)


def _zlib_dec(b: bytes) -> F32:
    return np.frombuffer(zlib.decompress(b), "<f4").reshape(-1, 33, 4)


_Q16_LO = np.array([-1.0, -1.0, -4.0, 0.0], np.float32)
_Q16_SPAN = np.array([3.0, 3.0, 8.0, 1.0], np.float32)


def _q16_enc(f: PoseFrame) -> bytes:
    import lz4.block

    q = np.rint((f.image - _Q16_LO) / _Q16_SPAN * 65535.0).astype("<u2")
    out: bytes = lz4.block.compress(q.tobytes(), store_size=True)
    return out


def _q16_dec(b: bytes) -> F32:
    import lz4.block

    q = np.frombuffer(lz4.block.decompress(b), "<u2").reshape(-1, 33, 4)
    out: F32 = (q.astype(np.float32) / 65535.0 * _Q16_SPAN + _Q16_LO).astype(np.float32)
    return out


BASELINES: dict[str, tuple[Callable[[PoseFrame], bytes], Callable[[bytes], F32]]] = {
    "json (MediaPipe dicts)": (_json_enc, _json_dec),
    "msgpack float32": (_msgpack_enc, _msgpack_dec),
    "raw float32": (_raw_enc, _raw_dec),
    "float32 + zlib": (_zlib_enc, _zlib_dec),
    "16-bit + lz4": (_q16_enc, _q16_dec),
}


# --------------------------------------------------------------------------- measurements


def _row(
    clip: str,
    noise: float,
    method: str,
    sizes: list[int],
    err: float,
    enc: list[float],
    dec: list[float],
) -> dict[str, Any]:
    return {
        "name": f"{clip} {method}",
        "clip": clip,
        "noise": noise,
        "method": method,
        "frames": len(sizes),
        "bytes_per_frame_mean": statistics.fmean(sizes),
        "bytes_per_frame_p99": pct(sizes, 99),
        "max_err_px": err,
        "encode_p50_us": pct(enc, 50),
        "decode_p50_us": pct(dec, 50),
        "enc_dec_p50_us": pct([a + b for a, b in zip(enc, dec, strict=True)], 50),
        "encode_p99_us": pct(enc, 99),
        "decode_p99_us": pct(dec, 99),
    }


def run_posewire(clip: Clip, noise: float, config: CodecConfig) -> dict[str, Any]:
    frames = frames_of(clip)
    enc = Encoder(config, 1, epoch=0)
    dec = Decoder()
    clock = time.perf_counter_ns
    sizes: list[int] = []
    te: list[float] = []
    td: list[float] = []
    worst = 0.0
    keys: list[int] = []
    world_err = 0.0
    for f in frames:
        t0 = clock()
        pkt = enc.encode(f)
        t1 = clock()
        res = dec.decode(pkt)
        t2 = clock()
        if not isinstance(res, Decoded):
            raise AssertionError(f"frame {f.seq} not decodable without loss")
        te.append((t1 - t0) / 1000)
        td.append((t2 - t1) / 1000)
        sizes.append(len(pkt))
        if peek_header(pkt).keyframe:
            keys.append(len(pkt))
        worst = max(worst, max_err_px(res.frame.image, f.image))
        if res.frame.world is not None and f.world is not None:
            world_err = max(world_err, float(np.abs(res.frame.world - f.world).max()))
    method = "posewire" + (" +world" if config.world else "")
    row = _row(clip.name, noise, method, sizes, worst, te, td)
    row["keyframe_bytes_mean"] = statistics.fmean(keys)
    if config.world:
        row["world_max_err_mm"] = world_err * 1000
    return row


def run_baseline(clip: Clip, noise: float, method: str) -> dict[str, Any]:
    enc_fn, dec_fn = BASELINES[method]
    frames = frames_of(clip)
    clock = time.perf_counter_ns
    sizes: list[int] = []
    te: list[float] = []
    td: list[float] = []
    worst = 0.0
    for f in frames:
        t0 = clock()
        b = enc_fn(f)
        t1 = clock()
        img = dec_fn(b)
        t2 = clock()
        te.append((t1 - t0) / 1000)
        td.append((t2 - t1) / 1000)
        sizes.append(len(b))
        worst = max(worst, max_err_px(img, f.image))
    return _row(clip.name, noise, method, sizes, worst, te, td)


def run_loss(
    clip: Clip,
    loss: float,
    mode: str,
    rtt: int,
    config: CodecConfig,
    seed: int,
    *,
    keyframes_lost: bool = True,
) -> dict[str, Any]:
    """Stream ``clip`` through seeded random loss; feedback arrives ``rtt`` frames late.
    ``keyframes_lost=False``: the loss spares keyframes (they travel reliably)."""
    frames = frames_of(clip)
    rng = np.random.default_rng(seed)
    lost_mask = rng.random(len(frames)) < loss
    enc = Encoder(config, 1, epoch=0)
    dec = Decoder()
    pending: deque[tuple[int, Feedback]] = deque()
    last_lost = -(10**9)
    worst_gap = 0
    decoded = undecodable = lost = 0
    worst_err = 0.0
    sizes: list[int] = []
    for i, f in enumerate(frames):
        while pending and pending[0][0] <= i:
            fb = pending.popleft()[1]
            if mode == "acks+kf":
                if fb.ack_seq is not None:
                    enc.on_ack(fb.ack_seq)
                if fb.keyframe_request:
                    enc.request_keyframe()
            else:
                enc.on_feedback(fb)
        pkt = enc.encode(f)
        sizes.append(len(pkt))
        if lost_mask[i] and (keyframes_lost or not peek_header(pkt).keyframe):
            lost += 1
            last_lost = i
            continue
        res = dec.decode(pkt)
        if isinstance(res, NeedKeyframe):
            undecodable += 1
            worst_gap = max(worst_gap, i - last_lost)
        else:
            decoded += 1
            worst_err = max(worst_err, max_err_px(res.frame.image, f.image))
        if mode != "none":
            pending.append((i + rtt, dec.ack_for(res)))
    return {
        "name": f"{clip.name} loss {loss:.0%} {mode}",
        "clip": clip.name,
        "loss": loss,
        "feedback": mode,
        "references": config.references,
        "keyframe_interval": config.effective_keyframe_interval(),
        "frames": len(frames),
        "lost": lost,
        "decoded": decoded,
        "decoded_fraction": decoded / len(frames),
        "undecodable": undecodable,
        "max_frames_loss_to_undecodable": worst_gap,
        "max_err_px": worst_err,
        "bytes_per_frame_mean": statistics.fmean(sizes),
        "keyframes": enc.stats.keyframes,
        "refreshes": enc.stats.refreshes,
    }


def reference_rows(
    clips: Sequence[Clip], noise: float, losses: Sequence[float], rtt: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The reference modes compared: (bytes rows, loss rows), aggregated over the clips.

    Bytes: one pose, 30 fps, detector noise, keyframe intervals 30 and 15. Loss: the
    delta packets of the noisy clips lost at random (seeded as in the loss table),
    keyframes delivered; the decoded fraction counts every frame (1 - loss at best)."""
    size_rows = []
    for interval in (30, 15):
        for refs in ("previous", "keyframe"):
            config = CodecConfig(keyframe_interval=interval, references=refs)
            sel = [run_posewire(noisy(c, noise), noise, config) for c in clips]
            frames = sum(r["frames"] for r in sel)
            size_rows.append(
                {
                    "name": f"all clips refs={refs} interval={interval}",
                    "references": refs,
                    "keyframe_interval": interval,
                    "frames": frames,
                    "bytes_per_frame_mean": sum(
                        r["bytes_per_frame_mean"] * r["frames"] for r in sel
                    )
                    / frames,
                    "keyframe_bytes_mean": statistics.fmean(r["keyframe_bytes_mean"] for r in sel),
                    "max_err_px": max(r["max_err_px"] for r in sel),
                }
            )
    loss_rows = []
    cases = (("previous", "none"), ("previous", "acks"), ("keyframe", "none"))
    for loss in losses:
        for refs, fb in cases:
            config = CodecConfig(references=refs)  # type: ignore[arg-type]
            sel = [
                run_loss(noisy(c, noise), loss, fb, rtt, config, 100 + k, keyframes_lost=False)
                for k, c in enumerate(clips)
            ]
            frames = sum(r["frames"] for r in sel)
            decoded = sum(r["decoded"] for r in sel)
            loss_rows.append(
                {
                    "name": f"all clips delta loss {loss:.0%} refs={refs} feedback={fb}",
                    "loss": loss,
                    "references": refs,
                    "feedback": fb,
                    "frames": frames,
                    "lost": sum(r["lost"] for r in sel),
                    "decoded": decoded,
                    "undecodable": sum(r["undecodable"] for r in sel),
                    "decoded_fraction": decoded / frames,
                    "max_err_px": max(r["max_err_px"] for r in sel),
                }
            )
    return size_rows, loss_rows


def checksum_rows(size: int = 64) -> list[dict[str, Any]]:
    import google_crc32c

    data = bytes(range(size))
    rows = []
    fns: dict[str, Callable[[], object]] = {
        "crc32c (google-crc32c)": lambda: google_crc32c.value(data)
    }
    try:
        import xxhash

        fns["xxh32 (xxhash)"] = lambda: xxhash.xxh32_intdigest(data)
        fns["xxh3_64 (xxhash)"] = lambda: xxhash.xxh3_64_intdigest(data)
    except ImportError:
        pass
    fns["zlib.crc32"] = lambda: zlib.crc32(data)
    for name, fn in fns.items():
        n = 100_000
        best = min(_timeit(fn, n) for _ in range(3))
        rows.append({"name": f"checksum {name}", "packet_bytes": size, "ns_per_packet": best * 1e9})
    return rows


def _timeit(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


# --------------------------------------------------------------------------- predictor fit


def _fit_features(
    q: npt.NDArray[np.float64],
    depth: int,
    grouped: bool,
    group_mean: npt.NDArray[np.float64],
    sel: npt.NDArray[np.bool_],
    t0: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    n = len(q)
    h = [q[t0 - i : n - i] for i in range(1, depth + 1)]
    fs = [h[i] - h[0] for i in range(1, depth)]
    if grouped:
        fs += [np.einsum("jk,tka->tja", group_mean, h[i]) - h[0] for i in range(depth)]
    x = np.stack(fs, -1) if fs else np.zeros((*h[0].shape, 0))
    return x[:, sel], (q[t0:] - h[0])[:, sel]


def fit(clips: Sequence[Clip], sigma: float) -> None:
    """Least-squares fit of the predictor taps (``COEFS`` in pipeline/codec/kernels.py);
    prints them in 1/256 with the mean squared residual, in-sample and leave-one-clip-out."""
    from pipeline.codec import kernels as codec_kernels
    from pipeline.codec.ranges import PREDICTOR_DEPTH

    group_mean = np.zeros((33, 33))
    for g in codec_kernels.RIGID_GROUPS:
        for a in g:
            group_mean[a, list(g)] = 1.0 / len(g)
    is_grouped = np.array([0 < group_mean[j, j] < 1 for j in range(33)])
    t0 = PREDICTOR_DEPTH + 1
    for comp in ("xy", "z", "world"):
        data = []
        for c in clips:
            nc = noisy(c, sigma)
            rng = np.random.default_rng(2)
            if comp == "xy":
                q = np.rint(nc.image[..., :2].astype(np.float64) * 1922)
            elif comp == "z":
                q = np.rint(nc.image[..., 2:3].astype(np.float64) * 51)
            else:
                w = c.world.astype(np.float64) + rng.normal(0, 0.005, c.world.shape)
                q = np.rint(w * 101)
            data.append(q)
        for d in range(1, PREDICTOR_DEPTH + 1):
            parts = []
            for grouped in (True, False):
                sel = is_grouped if grouped else ~is_grouped
                feats = [_fit_features(q, d, grouped, group_mean, sel, t0) for q in data]
                if feats[0][0].shape[-1] == 0:
                    parts.append("[]")
                    continue
                x_all = np.concatenate([x.reshape(-1, x.shape[-1]) for x, _ in feats])
                y_all = np.concatenate([y.ravel() for _, y in feats])
                coef = np.linalg.lstsq(x_all, y_all, rcond=None)[0]
                mse_in = float(np.mean((y_all - x_all @ coef) ** 2))
                loo = []
                for k in range(len(feats)):
                    xs = np.concatenate(
                        [x.reshape(-1, x.shape[-1]) for i, (x, _) in enumerate(feats) if i != k]
                    )
                    ys = np.concatenate([y.ravel() for i, (_, y) in enumerate(feats) if i != k])
                    ck = np.linalg.lstsq(xs, ys, rcond=None)[0]
                    xk, yk = feats[k]
                    loo.append(
                        float(np.mean((yk.ravel() - xk.reshape(-1, xk.shape[-1]) @ ck) ** 2))
                    )
                taps = np.rint(coef * 256).astype(int).tolist()
                kind = "grouped (a_2.., b_1..)" if grouped else "single (c_2..)"
                parts.append(f"{kind} {taps} mse {mse_in:.1f} loo {statistics.fmean(loo):.1f}")
            print(f"{comp} depth {d}: " + "; ".join(parts))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench codec", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--trace", action="append", default=[], type=Path, help="extra trace (.npz)"
    )
    parser.add_argument(
        "--noise", type=float, default=0.002, help="x/y noise sigma (default 0.002)"
    )
    parser.add_argument(
        "--loss", type=float, action="append", help="loss rate(s) (default 0.05, 0.2)"
    )
    parser.add_argument("--rtt", type=int, default=3, help="feedback delay in frames (default 3)")
    parser.add_argument("--fit", action="store_true", help="refit the predictor and print it")
    add_json_flag(parser)
    args = parser.parse_args(argv)

    paths = sorted(traces_dir().glob("*.npz")) + list(args.trace)
    if not paths:
        print(f"no traces found in {traces_dir()} (set POSEWIRE_TRACES)", file=sys.stderr)
        return 2
    clips = [load_clip(p) for p in paths]
    if args.fit:
        fit(clips, args.noise)
        return 0
    losses = args.loss or [0.05, 0.2]
    config = CodecConfig()
    rows: list[dict[str, Any]] = []
    for noise in (args.noise, 0.0):
        for clip in clips:
            c = noisy(clip, noise)
            rows.append(run_posewire(c, noise, config))
            rows.append(run_posewire(c, noise, CodecConfig(world=True)))
            for method in BASELINES:
                rows.append(run_baseline(c, noise, method))
    loss_rows = []
    for loss in losses:
        for mode in ("acks", "acks+kf", "none"):
            for k, clip in enumerate(clips):
                loss_rows.append(
                    run_loss(noisy(clip, args.noise), loss, mode, args.rtt, config, seed=100 + k)
                )
    ref_sizes, ref_loss = reference_rows(clips, args.noise, losses, args.rtt)
    two_leg = two_leg_rows([frames_of(noisy(c, args.noise)) for c in clips], losses, rtx=args.rtt)
    csum = checksum_rows()

    # aggregates over every clip, per method and noise (frame-weighted)
    summary = []
    for noise in (args.noise, 0.0):
        for method in ["posewire", "posewire +world", *BASELINES]:
            sel = [r for r in rows if r["noise"] == noise and r["method"] == method]
            frames = sum(r["frames"] for r in sel)
            summary.append(
                {
                    "name": f"all clips {method} noise={noise:g}",
                    "method": method,
                    "noise": noise,
                    "frames": frames,
                    "bytes_per_frame_mean": sum(
                        r["bytes_per_frame_mean"] * r["frames"] for r in sel
                    )
                    / frames,
                    "bytes_per_frame_p99_max": max(r["bytes_per_frame_p99"] for r in sel),
                    "max_err_px": max(r["max_err_px"] for r in sel),
                    "enc_dec_p50_us": statistics.median(r["enc_dec_p50_us"] for r in sel),
                }
            )
    pw = next(s for s in summary if s["method"] == "posewire" and s["noise"] == args.noise)
    js = next(s for s in summary if s["method"].startswith("json") and s["noise"] == args.noise)
    ack_rows = [r for r in loss_rows if r["feedback"] == "acks"]
    none_rows = [r for r in loss_rows if r["feedback"] == "none"]
    targets = [
        at_most(
            "posewire mean bytes/frame (noise, 1 pose, 30 fps)", pw["bytes_per_frame_mean"], 64
        ),
        at_most("posewire max error px @1920 (noise)", pw["max_err_px"], PRECISION_PX),
        at_least(
            "JSON bytes / posewire bytes (noise)",
            js["bytes_per_frame_mean"] / pw["bytes_per_frame_mean"],
            50,
        ),
        at_most("posewire encode+decode p50 us (1 pose, noise)", pw["enc_dec_p50_us"], 30),
        at_most(
            "max error px of every pose decoded under loss",
            max(r["max_err_px"] for r in loss_rows),
            PRECISION_PX,
        ),
        at_most(
            f"with acks: frames from a loss to an undecodable packet (rtt {args.rtt})",
            max(r["max_frames_loss_to_undecodable"] for r in ack_rows),
            args.rtt,
        ),
        at_most(
            "without acks: frames from a loss to an undecodable packet (keyframe interval)",
            max(r["max_frames_loss_to_undecodable"] for r in none_rows),
            config.keyframe_interval,
        ),
        at_least(
            "keyframe references: decoded / delivered frames under delta loss",
            min(
                r["decoded"] / (r["frames"] - r["lost"])
                for r in ref_loss
                if r["references"] == "keyframe"
            ),
            1.0,
        ),
        at_most(
            "keyframe references: max error px under delta loss",
            max(r["max_err_px"] for r in ref_loss),
            PRECISION_PX,
        ),
    ]
    targets += two_leg_targets(two_leg)
    all_rows = summary + rows + loss_rows + ref_sizes + ref_loss + two_leg + csum
    if args.json:
        report("codec", all_rows, targets, as_json=True, params=vars_jsonable(args))
        return 0
    print(f"# bench codec  (noise sigma {args.noise:g} on x/y, 0.01 on z; rtt {args.rtt} frames)\n")
    print(f"machine: {machine_info()['cpu_model']}, {machine_info()['cpu_count']} cpus\n")
    print("## all clips\n")
    print(
        markdown_table(
            summary,
            [
                "method",
                "noise",
                "frames",
                "bytes_per_frame_mean",
                "bytes_per_frame_p99_max",
                "max_err_px",
                "enc_dec_p50_us",
            ],
        )
    )
    cols = [
        "clip",
        "method",
        "bytes_per_frame_mean",
        "bytes_per_frame_p99",
        "max_err_px",
        "encode_p50_us",
        "decode_p50_us",
    ]
    for noise in (args.noise, 0.0):
        print(f"\n## per clip, noise {noise:g}\n")
        print(markdown_table([r for r in rows if r["noise"] == noise], cols))
    print("\n## loss\n")
    print(
        markdown_table(
            loss_rows,
            [
                "clip",
                "loss",
                "feedback",
                "lost",
                "decoded",
                "undecodable",
                "max_frames_loss_to_undecodable",
                "max_err_px",
                "bytes_per_frame_mean",
                "keyframes",
                "refreshes",
            ],
        )
    )
    print("\n## reference modes: bytes per frame (noise, 1 pose, 30 fps)\n")
    print(
        markdown_table(
            ref_sizes,
            [
                "references",
                "keyframe_interval",
                "frames",
                "bytes_per_frame_mean",
                "keyframe_bytes_mean",
                "max_err_px",
            ],
        )
    )
    print("\n## reference modes: delta packets lost at random, keyframes delivered\n")
    print(
        markdown_table(
            ref_loss,
            [
                "loss",
                "references",
                "feedback",
                "frames",
                "lost",
                "decoded",
                "undecodable",
                "decoded_fraction",
                "max_err_px",
            ],
        )
    )
    print(
        "\n## two legs: publisher -> server -> 3 subscribers (bench/codec_loss.py;"
        f" repair after {args.rtt} frames, SCTP timeout 30, hold 6)\n"
    )
    print(
        markdown_table(
            two_leg,
            [
                "loss",
                "leg",
                "references",
                "repair",
                "decoded_fraction",
                "target_fraction",
                "on_time_fraction",
                "wait_mean_frames",
                "wait_max_frames",
                "reliable_share",
                "bytes_per_frame_mean",
            ],
        )
    )
    print("\n## checksum\n")
    print(markdown_table(csum, ["name", "packet_bytes", "ns_per_packet"]))
    print("\n## targets\n")
    print(targets_table(targets))
    return 0


def vars_jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: (
            str(v)
            if isinstance(v, Path)
            else [str(x) for x in v]
            if isinstance(v, list) and v and isinstance(v[0], Path)
            else v
        )
        for k, v in vars(args).items()
    }


if __name__ == "__main__":
    raise SystemExit(main())
