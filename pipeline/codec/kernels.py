"""Compiled inner loops of the pose codec (numba): one call per packet and direction.

:mod:`pipeline.codec.encoder` and :mod:`pipeline.codec.decoder` own the packet, the
stream state and every message; this module owns the per-value work of a payload,
for the encoder and the decoder alike: quantization with validation, prediction
(inter from the reference history, intra along the skeleton tree), zigzag, the
choice of each group's Rice parameter, the bit-exact Rice layout of
docs/protocol.md, and the reference history a frame leaves for the next one.
docs/codec.md explains why this is compiled code and what it costs.

It imports only the value ranges (:mod:`pipeline.codec.ranges`) and the pose
model, never the codec modules, which load it on the first
:class:`~pipeline.codec.encoder.Encoder` or :class:`~pipeline.codec.decoder.Decoder`
(:func:`pipeline.codec.quant.load_kernels`), so header-only users such as the room
server never load numba. numba caches the machine code in this package's
``__pycache__``, keyed on this file's source: :func:`pipeline.codec.warm_kernels`
fills the cache once (``make install``). The ranges are compiled in as constants,
so a change to them needs a fresh cache (see :mod:`pipeline.codec.ranges`).

The output is byte for byte the output of the numpy implementation this replaced
(tests/test_protocol_golden.py holds 127 digests recorded from it).

History layout (``hist``, int32 ``[n, 7, 101]`` per decoded frame): channels 0-3
are the image components x, y, z, visibility, 4-6 the world x, y, z; columns
0-98 of a channel hold the quantized values of this frame, its reference and
that one's (33 each, newest first); column 99 is the Rice code of that group in
this frame's packet, column 100 of channels 0 and 4 the number of valid frames in
columns 0-98 (the prediction depth the next frame may use; 0 in channel 4 when
the frame has no world landmarks).

Errors are returned as status codes (see ``ST_*``), never raised: the caller turns
them into :class:`~pipeline.errors.ProtocolError` messages. Every read of packet
bytes is checked against the payload end, so arbitrary input cannot read out of
bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

from pipeline.codec.ranges import IMAGE_HI, IMAGE_LO, PREDICTOR_DEPTH, WORLD_RANGE_M
from pipeline.model.pose import NUM_LANDMARKS

L = NUM_LANDMARKS
DEPTH = PREDICTOR_DEPTH
MAX_K = 14
ZERO_GROUP = 15
MAX_Q_BITS = 6
"""The encoder never writes a unary part of 2**6 zeros or more."""
CHANNELS = 7
COL_CODE = DEPTH * L
COL_DEPTH = COL_CODE + 1
HIST_WIDTH = COL_DEPTH + 1
WORLD = 4
"""First world channel."""

# kernel parameter vector (``kp``, float64), built by pipeline.codec.quant.kernel_params
KP_SCALE = 0  # 4: quantization steps per unit of x, y, z, visibility
KP_INV = 4  # 4: their inverses
KP_LO = 8  # 4: smallest valid quantized value per image component
KP_HI = 12  # 4: largest
KP_ROOT = 16  # 4: intra prediction of the root landmark
KP_NW = 20  # world steps per metre
KP_INVW = 21  # 1 / KP_NW
KP_WLO = 22  # world quantized range
KP_WHI = 23
KP_SIZE = 24

# statuses
ST_OK = 0
ST_BAD_IMAGE = 1
"""An image value is NaN, infinite or out of range (the caller finds which)."""
ST_BAD_WORLD = 2
ST_RESIDUAL_TOO_LARGE = 3
ST_PAYLOAD_NOT_EMPTY = 4
"""aux: the payload length."""
ST_CODES_TRUNCATED = 5
ST_CODE_RANGE = 6
"""aux: the group code."""
ST_UNARY_TRUNCATED = 7
ST_REMAINDER_TRUNCATED = 8
ST_PADDING = 9
ST_IMAGE_RANGE = 10
ST_WORLD_RANGE = 11

F = TypeVar("F", bound=Callable[..., Any])


def _jit(fn: F) -> F:
    return cast(F, numba.njit(cache=True, nogil=True)(fn))


def _jit_inline(fn: F) -> F:
    """For the small helpers of the per-value loops: inlined into their callers (numba's
    own inlining), which keeps the loops as fast as if they were written out."""
    return cast(F, numba.njit(cache=True, nogil=True, inline="always")(fn))


Int32Array = npt.NDArray[np.int32]
Float32Array = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]
UInt8Array = npt.NDArray[np.uint8]
IntArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------------- model

# Parent of each landmark in the keyframe (intra) prediction tree; -1 = root.
# Every parent has a smaller index than its child.
PARENT: tuple[int, ...] = (
    -1, 0, 1, 2, 0, 4, 5, 3, 6, 0, 9,  # face: the nose is the root
    0, 11, 11, 12, 13, 14, 15, 16, 15, 16, 15, 16,  # shoulders, arms, hands
    11, 23, 23, 24, 25, 26, 27, 28, 27, 28,  # hips, legs, feet
)  # fmt: skip

# Rigid groups for the inter predictor: points that move together.
RIGID_GROUPS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),  # head
    (15, 17, 19, 21),  # left hand
    (16, 18, 20, 22),  # right hand
    (27, 29, 31),  # left foot
    (28, 30, 32),  # right foot
    (11, 12),  # shoulders
    (23, 24),  # hips
)

# Inter prediction coefficients in 1/256, per component class and depth d (the number
# of frames: h1 = the reference, h2 = its reference, h3 = that one's):
#   grouped landmark j: pred = h1_j + sum_{i>=2} a_i (h_i,j - h1_j) + sum_{i>=1} b_i (G(h_i) - h1_j)
#   single landmark j:  pred = h1_j + sum_{i>=2} c_i (h_i,j - h1_j)
# with G(h) the mean of j's rigid group. Visibility is predicted as h1. Fitted by
# least squares on the six CMU traces with detector-like noise and validated
# leave-one-clip-out (python -m bench.codec --fit prints the fit).
COEFS: dict[str, dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = {
    #        d: ((a_2..a_d), (b_1..b_d), (c_2..c_d))
    "xy": {1: ((), (0,), ()), 2: ((88,), (321, -317), (-144,)),
           3: ((74, 23), (282, -204, -75), (33, -113))},
    "z": {1: ((), (115,), ()), 2: ((89,), (94, -19), (113,)),
          3: ((65, 67), (121, 16, -81), (85, 51))},
    "world": {1: ((), (0,), ()), 2: ((76,), (295, -293), (-118,)),
              3: ((71, 7), (250, -185, -63), (30, -101))},
}  # fmt: skip

IMAGE_CLASSES = ("xy", "xy", "z", "vis")
WORLD_CLASSES = ("world", "world", "world")


def component_predictor(cls: str, depth: int) -> IntArray:
    """Integer matrix P (33 x 33*depth, units 2**-16): pred = floor(P @ [h1; h2; ..] + 1/2)."""
    mat = np.zeros((L, L * depth), np.int64)
    if cls == "vis":
        mat[:, :L] = np.eye(L, dtype=np.int64) << 16
        return mat
    a_taps, b_taps, c_taps = COEFS[cls][depth]
    group_of: dict[int, tuple[int, ...]] = {}
    for rigid in RIGID_GROUPS:
        for j in rigid:
            group_of[j] = rigid
    for j in range(L):
        grp = group_of.get(j)
        if grp is None:
            own = [256 - sum(c_taps), *c_taps]
            for i in range(depth):
                mat[j, i * L + j] += own[i] * 256
            continue
        own = [256 - sum(a_taps) - sum(b_taps), *a_taps]
        m = len(grp)
        for i in range(depth):
            mat[j, i * L + j] += own[i] * 256
            share = (2 * b_taps[i] * 256 + m) // (2 * m)  # floor(b * 256 / m + 1/2), exact
            for member in grp:
                mat[j, i * L + member] += share
    return mat


def _sparse_predictors() -> tuple[IntArray, IntArray, IntArray]:
    """The predictor matrices of every (image/world, depth, component) as one sparse
    table: the non-zeros of row j of that matrix are ``VAL[PTR[s, d, c, j] :
    PTR[s, d, c, j + 1]]`` at columns ``COL[...]`` (s = 0 image, 1 world)."""
    ptr = np.zeros((2, DEPTH + 1, 4, L + 1), np.int64)
    cols: list[int] = []
    vals: list[int] = []
    for s, classes in enumerate((IMAGE_CLASSES, WORLD_CLASSES)):
        for d in range(1, DEPTH + 1):
            for c, cls in enumerate(classes):
                mat = component_predictor(cls, d)
                for j in range(L):
                    ptr[s, d, c, j] = len(cols)
                    for col in np.flatnonzero(mat[j]):
                        cols.append(int(col))
                        vals.append(int(mat[j, col]))
                ptr[s, d, c, L] = len(cols)
    return ptr, np.array(cols, np.int64), np.array(vals, np.int64)


_PTR, _COL, _VAL = _sparse_predictors()
_PARENT = np.array(PARENT, np.int64)
_IN_LO = np.array(IMAGE_LO)
"""Accepted input values per image component (compiled in as constants)."""
_IN_HI = np.array(IMAGE_HI)
_IN_WORLD_LO, _IN_WORLD_HI = WORLD_RANGE_M


# --------------------------------------------------------------------------- shared pieces


@_jit_inline
def _inter(h: Int32Array, p: int, ch: int, s: int, c: int, d: int, j: int) -> int:
    """floor(P @ H + 1/2) for landmark j of channel ch of pose p of history h."""
    acc = 0
    for e in range(_PTR[s, d, c, j], _PTR[s, d, c, j + 1]):
        acc += _VAL[e] * np.int64(h[p, ch, _COL[e]])
    return (acc + 32768) >> 16


@_jit_inline
def _group_model(
    ref: Int32Array, ref_n: int, ref_world: bool, kp: FloatArray, p: int, ch: int
) -> tuple[bool, int, int, int, int]:
    """How channel ch of pose p is predicted: (inter, predictor set s, component c,
    depth d, intra root value). Inter from the reference when it has the pose (and,
    for a world channel, world landmarks); else intra along the skeleton tree."""
    is_world = ch >= WORLD
    inter = p < ref_n and (not is_world or ref_world)
    c = ch - WORLD if is_world else ch
    d = int(ref[p, WORLD if is_world else 0, COL_DEPTH]) if inter else 0
    root = 0 if is_world else int(kp[KP_ROOT + c])
    return inter, 1 if is_world else 0, c, d, root


@_jit_inline
def _prediction(
    hist: Int32Array,
    ref: Int32Array,
    p: int,
    ch: int,
    model: tuple[bool, int, int, int, int],
    j: int,
) -> int:
    """The prediction of landmark j (``hist`` holds this frame's landmarks before j:
    the intra parent of j always comes before it)."""
    inter, s, c, d, root = model
    if inter:
        return _inter(ref, p, ch, s, c, d, j)
    if j == 0:
        return root
    return int(hist[p, ch, _PARENT[j]])


@_jit_inline
def _bit(buf: bytes, pos: int, bit: int) -> int:
    """Bit ``bit`` (most significant first) of ``buf[pos:]``."""
    return (buf[pos + (bit >> 3)] >> (7 - (bit & 7))) & 1


@_jit_inline
def _ref_code(ref: Int32Array, ref_n: int, ref_world: bool, p: int, ch: int) -> int:
    """The Rice code of the same group in the reference packet (15 where it has none)."""
    if p >= ref_n or (ch >= WORLD and not ref_world):
        return ZERO_GROUP
    return int(ref[p, ch, COL_CODE])


@_jit
def _stack_history(
    hist: Int32Array, ref: Int32Array, ref_n: int, ref_world: bool, has_world: bool
) -> None:
    """Fill the reference part and depths of a new frame's history (``hist`` holds its
    own values in columns 0-32): its reference's newest two frames follow."""
    n = hist.shape[0]
    for p in range(n):
        inter = p < ref_n
        hist[p, 0, COL_DEPTH] = min(DEPTH, ref[p, 0, COL_DEPTH] + 1) if inter else 1
        last = WORLD + 3 if has_world else WORLD
        if has_world:
            winter = inter and ref_world
            hist[p, WORLD, COL_DEPTH] = min(DEPTH, ref[p, WORLD, COL_DEPTH] + 1) if winter else 1
        if not inter:
            continue
        for ch in range(last):
            if ch >= WORLD and not ref_world:
                break
            for col in range(L, DEPTH * L):
                hist[p, ch, col] = ref[p, ch, col - L]


@_jit_inline
def _put(
    out: UInt8Array, o: int, acc: int, nacc: int, value: int, bits: int
) -> tuple[int, int, int]:
    """Append the low ``bits`` (at most 33) bits of ``value`` to the bit string whose
    last ``nacc`` (< 8) bits are pending in ``acc`` and whose whole bytes are
    ``out[:o]``; returns the new (acc, nacc, o)."""
    acc = (acc << bits) | value
    nacc += bits
    while nacc >= 8:
        nacc -= 8
        out[o] = (acc >> nacc) & 0xFF
        o += 1
    return acc & ((1 << nacc) - 1), nacc, o


@_jit
def _bit_length(v: int | np.int64) -> int:
    b = 0
    while v:
        v >>= 1
        b += 1
    return b


# --------------------------------------------------------------------------- encoder


@_jit
def encode_payload(
    img: npt.NDArray[np.floating[Any]],
    world: npt.NDArray[np.floating[Any]],
    world_scale: npt.NDArray[np.floating[Any]],
    use_world: bool,
    kp: FloatArray,
    ref: Int32Array,
    ref_n: int,
    ref_world: bool,
    out: UInt8Array,
) -> tuple[int, int, Int32Array]:
    """Code one frame against its reference (``ref_n = -1``: a keyframe).

    Writes the payload's bit section to ``out`` (large enough for any frame);
    returns (status, payload bytes, the frame's history).
    """
    n = img.shape[0]
    hist = np.zeros((n, CHANNELS, HIST_WIDTH), np.int32)
    # validate and quantize (NaN fails both comparisons)
    for p in range(n):
        for j in range(L):
            for c in range(4):
                v = np.float64(img[p, j, c])
                if not (v >= _IN_LO[c] and v <= _IN_HI[c]):
                    return ST_BAD_IMAGE, 0, hist
                hist[p, c, j] = np.int32(np.rint(v * kp[KP_SCALE + c]))
    if use_world:
        nw = world_scale[0]  # steps per metre in the dtype of ``world`` (see the encoder)
        for p in range(n):
            for j in range(L):
                for c in range(3):
                    v = world[p, j, c]
                    if not (v >= _IN_WORLD_LO and v <= _IN_WORLD_HI):
                        return ST_BAD_WORLD, 0, hist
                    hist[p, WORLD + c, j] = np.int32(np.rint(v * nw))
    has_ref = ref_n >= 0
    m = ref_n if has_ref else 0
    per_pose = 7 if use_world else 4
    n_groups = n * per_pose
    u = np.empty(n_groups * L, np.int64)
    codes = np.empty(n_groups, np.int64)
    ref_codes = np.empty(n_groups, np.int64)
    # residuals (zigzagged) and each group's Rice code
    for p in range(n):
        for ch in range(per_pose):
            model = _group_model(ref, m, ref_world, kp, p, ch)
            g = p * per_pose + ch
            total = np.int64(0)
            top = np.int64(0)
            for j in range(L):
                r = np.int64(hist[p, ch, j]) - _prediction(hist, ref, p, ch, model, j)
                z = (r << 1) ^ (r >> 63)
                u[g * L + j] = z
                total += z
                if z > top:
                    top = z
            rc = _ref_code(ref, m, ref_world, p, ch)
            ref_codes[g] = rc
            if top == 0:
                k = ZERO_GROUP
            else:
                kmin = _bit_length(top >> MAX_Q_BITS)
                k = max(0, _bit_length(total // L) - 1)
                if kmin > k:
                    k = kmin
                if k > MAX_K:
                    return ST_RESIDUAL_TOO_LARGE, 0, hist
                # keep the reference's code when it is a neighbour costing (by the
                # estimate sum / 2**k + 33 * (k + 1/2 + 2**-k / 2)) at most 1.5 bits more
                if (
                    (rc == k + 1 or rc == k - 1)
                    and kmin <= rc <= MAX_K
                    and total / (1 << rc) + L * (rc + 0.5 + 0.5 / (1 << rc))
                    <= total / (1 << k) + L * (k + 0.5 + 0.5 / (1 << k)) + 1.5
                ):
                    k = rc
            codes[g] = k
            hist[p, ch, COL_CODE] = k
    # the bit section: group codes, unary parts, remainders, zero padding
    acc = 0
    nacc = 0
    o = 0
    for g in range(n_groups):
        k = codes[g]
        rc = ref_codes[g]
        if k == rc:
            value, bits = 0, 1
        elif k == rc + 1:
            value, bits = 2, 2
        elif k == rc - 1:
            value, bits = 6, 3
        else:
            value, bits = 0x70 | k, 7
        acc, nacc, o = _put(out, o, acc, nacc, value, bits)
    for g in range(n_groups):
        k = codes[g]
        if k == ZERO_GROUP:
            continue
        for i in range(g * L, g * L + L):
            q = u[i] >> k  # q < 64 zeros, then a one
            if q >= 32:
                acc, nacc, o = _put(out, o, acc, nacc, 0, 32)
                q -= 32
            acc, nacc, o = _put(out, o, acc, nacc, 1, q + 1)
    for g in range(n_groups):
        k = codes[g]
        if k == ZERO_GROUP or k == 0:
            continue
        mask = (1 << k) - 1
        for i in range(g * L, g * L + L):
            acc, nacc, o = _put(out, o, acc, nacc, u[i] & mask, k)
    if nacc:
        out[o] = (acc << (8 - nacc)) & 0xFF
        o += 1
    _stack_history(hist, ref, m, ref_world, use_world)  # m = 0 for a keyframe
    return ST_OK, o, hist


def max_payload_bytes(n_poses: int) -> int:
    """Bound of :func:`encode_payload`'s output for ``n_poses`` poses with world
    landmarks: 7 code bits per group, at most 64 unary and 14 remainder bits per value."""
    groups = 7 * n_poses
    return (groups * 7 + groups * L * ((1 << MAX_Q_BITS) + MAX_K) + 7) // 8


# --------------------------------------------------------------------------- decoder


@_jit
def decode_payload(
    buf: bytes,
    pos: int,
    end: int,
    n: int,
    has_world: bool,
    kp: FloatArray,
    ref: Int32Array,
    ref_n: int,
    ref_world: bool,
) -> tuple[int, int, Int32Array, Float32Array, Float32Array]:
    """Decode the bit section ``buf[pos:end]`` of a frame of ``n`` poses against its
    reference (``ref_n = -1``: a keyframe): returns (status, aux, history, image
    [n, 33, 4], world [n, 33, 3] or empty)."""
    per_pose = 7 if has_world else 4
    n_groups = n * per_pose
    hist = np.zeros((n, CHANNELS, HIST_WIDTH), np.int32)
    image = np.empty((n, L, 4), np.float32)
    world = np.empty((n if has_world else 0, L, 3), np.float32)
    has_ref = ref_n >= 0
    m = ref_n if has_ref else 0
    n_bits = 8 * (end - pos)
    if n_groups == 0:
        if end != pos:
            return ST_PAYLOAD_NOT_EMPTY, end - pos, hist, image, world
        return ST_OK, 0, hist, image, world
    # group codes
    bit = 0
    codes = np.empty(n_groups, np.int64)
    n_vals = 0
    rlen = 0
    for p in range(n):
        for ch in range(per_pose):
            rc = _ref_code(ref, m, ref_world, p, ch)
            ones = 0
            while ones < 3:
                if bit >= n_bits:
                    return ST_CODES_TRUNCATED, 0, hist, image, world
                b = _bit(buf, pos, bit)
                bit += 1
                if not b:
                    break
                ones += 1
            if ones == 0:
                c = rc
            elif ones == 1:
                c = rc + 1
            elif ones == 2:
                c = rc - 1
            else:
                if bit + 4 > n_bits:
                    return ST_CODES_TRUNCATED, 0, hist, image, world
                c = 0
                for _ in range(4):
                    c = (c << 1) | _bit(buf, pos, bit)
                    bit += 1
            if c < 0 or c > ZERO_GROUP:
                return ST_CODE_RANGE, c, hist, image, world
            codes[p * per_pose + ch] = c
            hist[p, ch, COL_CODE] = c
            if c != ZERO_GROUP:
                n_vals += L
                rlen += c * L
    n_prefix = bit
    if n_vals == 0:
        pad = n_bits - n_prefix
        if pad >= 8 or buf[end - 1] & ((1 << pad) - 1):
            return ST_PADDING, 0, hist, image, world
    # unary parts
    u = np.zeros(n_groups * L, np.int64)
    for g in range(n_groups):
        k = codes[g]
        if k == ZERO_GROUP:
            continue
        for i in range(g * L, g * L + L):
            q = 0
            while True:
                if bit >= n_bits:
                    return ST_UNARY_TRUNCATED, 0, hist, image, world
                byte = buf[pos + (bit >> 3)]
                off = bit & 7
                rest = (byte << off) & 0xFF  # the unread bits of this byte, at the top
                if rest == 0:
                    q += 8 - off
                    bit += 8 - off
                    continue
                z = 0
                while not rest & 0x80:
                    rest <<= 1
                    z += 1
                q += z
                bit += z + 1
                break
            u[i] = q << k
    used = bit + rlen
    pad = n_bits - used
    if pad < 0:
        return ST_REMAINDER_TRUNCATED, 0, hist, image, world
    if pad >= 8 or buf[end - 1] & ((1 << pad) - 1):
        return ST_PADDING, 0, hist, image, world
    # remainders
    for g in range(n_groups):
        k = codes[g]
        if k == ZERO_GROUP or k == 0:
            continue
        for i in range(g * L, g * L + L):
            v = 0
            for _ in range(k):
                v = (v << 1) | _bit(buf, pos, bit)
                bit += 1
            u[i] += v
    # reconstruction (image values out of range fail at once; world values only
    # after every image value was checked, as the error names the image first)
    world_bad = False
    for p in range(n):
        for ch in range(per_pose):
            model = _group_model(ref, m, ref_world, kp, p, ch)
            c = model[2]
            is_world = ch >= WORLD
            base = (p * per_pose + ch) * L
            for j in range(L):
                z = u[base + j]
                q = _prediction(hist, ref, p, ch, model, j) + ((z >> 1) ^ -(z & 1))
                if is_world:
                    if not (kp[KP_WLO] <= q <= kp[KP_WHI]):
                        world_bad = True
                        q = 0
                elif not (kp[KP_LO + c] <= q <= kp[KP_HI + c]):
                    return ST_IMAGE_RANGE, 0, hist, image, world
                hist[p, ch, j] = q
    if world_bad:
        return ST_WORLD_RANGE, 0, hist, image, world
    for p in range(n):
        for j in range(L):
            for c in range(4):
                image[p, j, c] = np.float32(np.float64(hist[p, c, j]) * kp[KP_INV + c])
            if has_world:
                for c in range(3):
                    world[p, j, c] = np.float32(np.float64(hist[p, WORLD + c, j]) * kp[KP_INVW])
    _stack_history(hist, ref, m, ref_world, has_world)  # m = 0 for a keyframe
    return ST_OK, 0, hist, image, world
