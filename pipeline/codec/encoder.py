"""The pose encoder: one :class:`Encoder` per publisher stream, frames in, packets out.

``docs/protocol.md`` describes the payload bit by bit; the per-value work is one
call of the compiled :func:`pipeline.codec.kernels.encode_payload` per packet, the
header and checksum come from :mod:`pipeline.codec.header`.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.codec.feedback import Feedback
from pipeline.codec.header import (
    ANCHOR_INTERVAL,
    CHECKSUM_BYTES,
    EPOCH_MASK,
    MAX_PACKET_BYTES,
    MAX_REF_DELTA,
    MAX_SEQ,
    MAX_STREAM_ID,
    MAX_WIRE_POSES,
    TS_RESIDUAL_LIMIT,
    delta_prefix,
    finish_packet,
    put_varint,
    write_header,
)
from pipeline.codec.quant import (
    NO_REF,
    NO_WORLD,
    NO_WORLD_SCALE,
    CodecConfig,
    Entry,
    FloatArray,
    Quant,
    kernel_params,
    load_kernels,
)
from pipeline.codec.ranges import (
    HISTORY,
    IMAGE_COMPONENTS,
    IMAGE_HI,
    IMAGE_LO,
    WORLD_COMPONENTS,
    WORLD_HI,
    WORLD_LO,
)
from pipeline.errors import PacketTooLargeError, ProtocolError
from pipeline.model.pose import LANDMARK_NAMES, NUM_LANDMARKS, PoseFrame

_L = NUM_LANDMARKS


# --------------------------------------------------------------------------- validation

_INT_TYPES = (int, np.integer)


def _check_block(
    arr: object, n_cols: int, what: str, max_poses: int, n_expected: int | None
) -> npt.NDArray[np.floating[npt.NBitBase] | np.integer[npt.NBitBase]]:
    if not isinstance(arr, np.ndarray):
        raise ProtocolError(f"{what} landmarks must be a numpy array, not {type(arr).__name__}")
    if arr.ndim != 3 or arr.shape[1:] != (_L, n_cols):
        raise ProtocolError(
            f"{what} landmarks must have shape [n, {_L}, {n_cols}], got {list(arr.shape)}"
        )
    if n_expected is not None and arr.shape[0] != n_expected:
        raise ProtocolError(f"{arr.shape[0]} {what} poses for {n_expected} image poses")
    if arr.shape[0] > max_poses:
        raise ProtocolError(f"{arr.shape[0]} poses in one frame, at most {max_poses}")
    if arr.dtype.kind not in "fiu":
        raise ProtocolError(f"{what} landmarks must be numbers, not {arr.dtype}")
    return arr


def _check_values(
    arr: npt.NDArray[Any], lo: FloatArray, hi: FloatArray, names: tuple[str, ...], what: str
) -> None:
    """Raise the error naming the first value of ``arr`` ([n, 33, c]) outside [lo, hi]
    per component (or NaN). The kernels check the same; this finds which value."""
    a = arr.astype(np.float64)
    bad = np.argwhere(~((a >= lo) & (a <= hi)))
    if not bad.size:
        return
    p, j, c = (int(i) for i in bad[0])
    v = float(a[p, j, c])
    why = "not finite" if not math.isfinite(v) else f"outside [{lo[c]:g}, {hi[c]:g}]"
    raise ProtocolError(
        f"pose {p} landmark {j} ({LANDMARK_NAMES[j]}) {what}{names[c]} = {v!r} is {why}"
    )


def _check_image_values(img: npt.NDArray[Any]) -> None:
    _check_values(img, IMAGE_LO, IMAGE_HI, IMAGE_COMPONENTS, "")


def _check_world_values(w: npt.NDArray[Any]) -> None:
    _check_values(w, WORLD_LO, WORLD_HI, WORLD_COMPONENTS, "world ")


_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _kernel_input(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``arr`` as the kernels take it: C-contiguous float32 or float64 (other number
    types become float64, exactly)."""
    if arr.dtype not in _KERNEL_DTYPES:
        return np.ascontiguousarray(arr, np.float64)
    if not arr.flags.c_contiguous:
        return np.ascontiguousarray(arr)
    return arr


# --------------------------------------------------------------------------- encoder


@dataclass
class EncoderStats:
    """Counters of an :class:`Encoder`."""

    packets: int = 0
    """Packets produced."""
    keyframes: int = 0
    """Keyframes among them."""
    refreshes: int = 0
    """Delta packets predicted from an acknowledged frame after a refresh request."""
    bytes: int = 0
    """Total bytes produced."""
    world_dropped: int = 0
    """Frames whose world landmarks were left out so that the packet fits."""


class Encoder:
    """Encodes the :class:`PoseFrame` s of one publisher stream into packets.

    Each packet predicts from the previous packet, or is a keyframe: for the first
    frame, every ``keyframe_interval`` frames, after :meth:`request_keyframe`, and
    when the sequence number does not increase. :meth:`on_ack` records frames the
    receiver decoded; after :meth:`request_refresh` the next packet predicts from
    the newest of them instead of the previous packet (cheaper than a keyframe).
    No packet references a frame older than the newest keyframe, so the newest
    keyframe and the packets after it always suffice to decode (late joiners).

    With ``config.references == "keyframe"`` every delta packet predicts from the
    stream's latest keyframe instead (kept in the encoder until the next keyframe),
    so a delta packet decodes whenever its keyframe did, whatever else was lost;
    the keyframe interval is then at most ``HISTORY - 1``
    (:meth:`CodecConfig.effective_keyframe_interval`) and a refresh request is
    answered with a keyframe: the packets go to many receivers, none of whose
    acknowledged frames is known to be held by all.

    With ``config.references == "anchor"`` a delta packet at least
    :data:`~pipeline.codec.header.ANCHOR_INTERVAL` sequence numbers after the
    latest anchor (or keyframe) is the next anchor, and every delta packet predicts
    from the latest anchor or keyframe: anchors (and keyframes) must arrive, the
    other deltas may be lost without harm. A refresh request is answered with a
    keyframe, as in keyframe mode.

    A frame whose packet would not fit under :data:`MAX_PACKET_BYTES` is sent
    without its world landmarks (counted in ``stats.world_dropped``); when even
    that does not fit, :meth:`encode` raises :class:`PacketTooLargeError` and
    the encoder state is unchanged.
    """

    def __init__(self, config: CodecConfig, stream_id: int, *, epoch: int | None = None) -> None:
        if not 0 <= stream_id <= MAX_STREAM_ID:
            raise ProtocolError(f"stream id {stream_id} out of range 0..{MAX_STREAM_ID}")
        self.config = config
        self.stream_id = stream_id
        self.epoch = (secrets.randbelow(4) if epoch is None else epoch) & EPOCH_MASK
        """Two-bit id of this encoder instance, in every packet (random by default)."""
        self.stats = EncoderStats()
        self._quant = Quant.from_config(config)
        load_kernels()
        self._kp = kernel_params(self._quant)
        self._w_scale32 = np.array([self._quant.n_world], np.float32)
        self._w_scale64 = np.array([self._quant.n_world], np.float64)
        """World steps per metre in the dtype of the world landmarks: the product is
        rounded in that dtype (as numpy rounds ``float32 array * float``)."""
        self._out = np.zeros(load_kernels().max_payload_bytes(config.max_poses), np.uint8)
        self._heads: dict[tuple[int, bool, int, int], bytes] = {}
        """Delta packet header starts (magic, flags, stream id) per (pose count, world,
        epoch, stream id)."""
        self._history: dict[int, Entry] = {}
        self._prev: Entry | None = None
        self._keyframe_refs = config.references == "keyframe"
        """Delta packets predict from ``_key`` (the latest keyframe), not ``_prev``."""
        self._interval = config.effective_keyframe_interval()
        self._key: Entry | None = None
        """The latest keyframe (the reference of every delta packet in keyframe mode),
        or in anchor mode the latest anchor or keyframe."""
        self._anchor_refs = config.references == "anchor"
        """Delta packets predict from ``_key``, which each anchor replaces."""
        self._since_key = 0
        self._force_key = False
        self._refresh = False
        self._acked: int | None = None
        self._recovered_at = -1
        """Sequence number of the last keyframe or refresh packet."""

    # -- feedback

    def on_ack(self, seq: int) -> None:
        """The receiver decoded ``seq``: it may serve as a reference after a loss."""
        if seq in self._history and (self._acked is None or seq > self._acked):
            self._acked = seq

    def request_keyframe(self) -> None:
        """Make the next packet a keyframe."""
        self._force_key = True

    def request_refresh(self) -> None:
        """The receiver lost the chain: the next packet predicts from the newest
        acknowledged frame the receiver still holds, or is a keyframe when there is
        none."""
        self._refresh = True

    def on_feedback(self, fb: Feedback) -> None:
        """Apply a receiver's :class:`Feedback` (an ack and/or a refresh request)."""
        if fb.stream_id != self.stream_id:
            return
        if fb.ack_seq is not None:
            self.on_ack(fb.ack_seq)
        if fb.keyframe_request and (fb.failed_seq is None or fb.failed_seq > self._recovered_at):
            self.request_refresh()

    # -- encoding

    def _inputs(self, frame: PoseFrame) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
        """The frame's image (and world) landmarks, checked for shape and type."""
        cfg = self.config
        img = _kernel_input(_check_block(frame.image, 4, "image", cfg.max_poses, None))
        if not cfg.world or frame.world is None:
            return img, None
        try:
            w = _check_block(frame.world, 3, "world", cfg.max_poses, img.shape[0])
        except ProtocolError:
            _check_image_values(img)  # a bad image value is reported first
            raise
        return img, _kernel_input(w)

    def _choose_ref(self, seq: int, keyframe: bool) -> Entry | None:
        prev = self._prev
        interval = self._interval
        if (
            keyframe
            or self._force_key
            or prev is None
            or seq <= prev.seq
            or seq - prev.seq > MAX_REF_DELTA
            or (interval > 0 and self._since_key + 1 >= interval)
        ):
            return None
        if self._keyframe_refs or self._anchor_refs:
            key = self._key
            if self._refresh or key is None or seq - key.seq > MAX_REF_DELTA:
                return None
            return key
        if not self._refresh:
            return prev
        acked = self._acked
        ref = self._history.get(acked) if acked is not None else None
        if ref is None or ref.key_seq != prev.key_seq or seq - ref.seq > MAX_REF_DELTA:
            return None
        return ref

    def encode(self, frame: PoseFrame, *, keyframe: bool = False) -> bytes:
        """Encode one frame into one packet (``keyframe=True`` forces a keyframe).

        Raises :class:`ProtocolError`, leaving the encoder state unchanged, for a
        frame that cannot be encoded: NaN or infinite values, wrong shapes or
        dtypes, values outside the documented ranges, too many poses, a sequence
        number or timestamp out of range, or a packet that would not fit.
        """
        seq = frame.seq
        ts = frame.capture_ts_ns
        if not isinstance(seq, _INT_TYPES) or not 0 <= seq <= MAX_SEQ:
            raise ProtocolError(f"sequence number {seq!r} not an integer in 0..{MAX_SEQ}")
        if not isinstance(ts, _INT_TYPES) or not -(2**63) <= ts < 2**63:
            raise ProtocolError(f"capture timestamp {ts!r} not an int64")
        seq = int(seq)
        ts = int(ts)
        img, world = self._inputs(frame)
        ref = self._choose_ref(seq, keyframe)
        try:
            packet, entry = self._build(seq, ts, img, world, ref)
        except PacketTooLargeError:
            if world is None:
                raise
            packet, entry = self._build(seq, ts, img, None, ref)
            self.stats.world_dropped += 1
        # commit the new state
        if ref is None:
            self._since_key = 0
            self._force_key = False
            self.stats.keyframes += 1
            self._history.clear()  # older frames are never referenced again
            self._acked = None
            self._recovered_at = seq
            self._key = entry
        else:
            self._since_key += 1
            if self._anchor_refs:
                if seq - ref.seq >= ANCHOR_INTERVAL:
                    self._key = entry  # an anchor: the reference of the next deltas
            elif ref is not self._prev and not self._keyframe_refs:
                self.stats.refreshes += 1
                self._recovered_at = seq
        self._refresh = False
        self._history[seq] = entry
        # keep only frames the decoder is sure to still hold (it keeps HISTORY frames)
        while len(self._history) > HISTORY // 2:
            old = next(iter(self._history))
            del self._history[old]
            if self._acked == old:
                self._acked = None
        self._prev = entry
        self.stats.packets += 1
        self.stats.bytes += len(packet)
        return packet

    def _build(
        self,
        seq: int,
        ts: int,
        img: npt.NDArray[Any],
        world: npt.NDArray[Any] | None,
        ref: Entry | None,
    ) -> tuple[bytes, Entry]:
        n = img.shape[0]
        has_world = world is not None
        w: npt.NDArray[Any]
        w_scale: npt.NDArray[Any]
        if world is None:
            w, w_scale = NO_WORLD, NO_WORLD_SCALE
        else:
            w = world
            w_scale = self._w_scale32 if world.dtype == np.float32 else self._w_scale64
        k = load_kernels()
        status, nbytes, hist = k.encode_payload(
            img,
            w,
            w_scale,
            has_world,
            self._kp,
            NO_REF if ref is None else ref.hist,
            -1 if ref is None else ref.n,
            ref is not None and ref.world,
            self._out,
        )
        if status:
            if status == k.ST_BAD_IMAGE:
                _check_image_values(img)
            elif status == k.ST_BAD_WORLD and world is not None:
                _check_world_values(world)
            elif status == k.ST_RESIDUAL_TOO_LARGE:
                raise ProtocolError("residual too large to code")
            raise ProtocolError(f"encoder kernel status {status}")  # not reached
        payload = self._out[:nbytes].tobytes()
        out = bytearray()
        gap = 0
        if ref is None:
            payload = self._quant.to_bytes() + payload
            ts_field = ts
            entry_ts = ts
            step_us = 0
        else:
            gap = seq - ref.seq
            d_us = (ts - ref.ts + 500) // 1000
            ts_field = d_us - ref.step_us * gap
            entry_ts = ref.ts + d_us * 1000
            step_us = d_us // gap
            if not -(2**63) <= entry_ts < 2**63:
                raise ProtocolError("capture timestamp too far from the reference's")
        if ref is None or not (1 <= gap <= MAX_REF_DELTA and 0 <= n <= MAX_WIRE_POSES):
            write_header(
                out,
                stream_id=self.stream_id,
                seq=seq,
                keyframe=ref is None,
                has_world=has_world,
                num_poses=n,
                ts_field=ts_field,
                ref_seq=None if ref is None else ref.seq,
                payload_len=len(payload),
                epoch=self.epoch,
            )
        else:
            # a delta packet (the common case): what write_header writes, with the
            # magic, flags and stream id cached (seq was checked by encode(), the
            # reference by _choose_ref)
            if not -TS_RESIDUAL_LIMIT < ts_field < TS_RESIDUAL_LIMIT:
                raise ProtocolError("capture timestamp too far from the reference's")
            key = (n, has_world, self.epoch, self.stream_id)
            head = self._heads.get(key)
            if head is None:
                head = self._heads[key] = delta_prefix(self.stream_id, n, has_world, self.epoch)
            out += head
            put_varint(out, seq)
            put_varint(out, gap)
            put_varint(out, (ts_field << 1) if ts_field >= 0 else ((-ts_field << 1) - 1))
            put_varint(out, len(payload))
        out += payload
        if len(out) + CHECKSUM_BYTES >= MAX_PACKET_BYTES:
            raise PacketTooLargeError(
                f"frame {seq} with {n} poses{' and world landmarks' if has_world else ''}"
                f" needs {len(out) + CHECKSUM_BYTES} bytes; packets must stay under "
                f"{MAX_PACKET_BYTES} (send fewer poses, or no world landmarks)"
            )
        packet = finish_packet(out)
        key_seq = seq if ref is None else ref.key_seq
        entry = Entry(
            seq, entry_ts, step_us, self.epoch, self._quant, n, hist, has_world, key_seq, self._kp
        )
        return packet, entry
