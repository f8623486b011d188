"""The pose decoder: one :class:`Decoder` for any number of publisher streams.

It validates everything (header, checksum, quantization, every code of the payload
and every decoded value) and raises nothing but
:class:`~pipeline.errors.ProtocolError`, whatever the bytes. The per-value work is
one call of the compiled :func:`pipeline.codec.kernels.decode_payload` per packet.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pipeline.codec.feedback import Feedback
from pipeline.codec.header import (
    FLAG_KEYFRAME,
    FLAG_WORLD,
    PacketHeader,
    as_bytes,
    make_header,
    parse_header,
)
from pipeline.codec.quant import (
    NO_REF,
    CodecConfig,
    Entry,
    Quant,
    kernel_params,
    load_kernels,
)
from pipeline.codec.ranges import HISTORY
from pipeline.errors import ProtocolError
from pipeline.model.pose import PoseFrame

# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Decoded:
    """A successfully decoded packet."""

    frame: PoseFrame
    """The decoded poses (every value within the stream's precision of the original;
    the capture timestamp of a delta packet within 0.5 us)."""
    header: PacketHeader
    """The packet header, with ``capture_ts_ns`` filled in."""


@dataclass(frozen=True, slots=True)
class NeedKeyframe:
    """The packet predicts from a frame this decoder does not have: nothing was decoded.

    The receiver should ask the publisher for a keyframe (:meth:`Decoder.ack_for`
    says when); later packets decode again from the next keyframe or refresh.
    """

    stream_id: int
    """Publisher stream of the packet."""
    seq: int
    """Sequence number of the packet that could not be decoded."""
    missing_ref: int
    """The reference frame the decoder lacks."""


# --------------------------------------------------------------------------- decoder


def _decode_error(status: int, aux: int) -> str:
    k = load_kernels()
    messages = {
        k.ST_PAYLOAD_NOT_EMPTY: f"{aux} payload bytes where none are expected",
        k.ST_CODES_TRUNCATED: "payload truncated inside the group codes",
        k.ST_CODE_RANGE: f"group code {aux} out of range",
        k.ST_UNARY_TRUNCATED: "payload truncated inside the unary codes",
        k.ST_REMAINDER_TRUNCATED: "payload truncated inside the remainders",
        k.ST_PADDING: "payload has trailing bytes or non-zero padding",
        k.ST_IMAGE_RANGE: "decoded image landmarks out of range: corrupt payload",
        k.ST_WORLD_RANGE: "decoded world landmarks out of range: corrupt payload",
    }
    return messages.get(status, f"decoder kernel status {status}")


class _Stream:
    __slots__ = ("entries", "epoch", "max_seq")

    def __init__(self, epoch: int) -> None:
        self.entries: dict[int, Entry] = {}
        self.epoch = epoch
        self.max_seq = -1


@dataclass
class DecoderStats:
    """Counters of a :class:`Decoder`."""

    decoded: int = 0
    """Packets decoded."""
    need_keyframe: int = 0
    """Packets that could not be decoded for lack of their reference."""
    errors: int = 0
    """Packets refused with :class:`ProtocolError`."""


class Decoder:
    """Decodes packets of any number of publisher streams.

    Keeps per stream the last :data:`HISTORY` decoded frames (the possible
    references), and at most ``max_streams`` streams (the least recently used
    go), so its memory is bounded whatever it is fed. :meth:`decode` raises
    nothing but :class:`ProtocolError`.
    """

    def __init__(self, config: CodecConfig | None = None, *, max_streams: int = 256) -> None:
        self.config = config if config is not None else CodecConfig()
        self.max_streams = max_streams
        self.stats = DecoderStats()
        load_kernels()
        self._streams: OrderedDict[int, _Stream] = OrderedDict()

    def decode(self, packet: bytes | bytearray | memoryview) -> Decoded | NeedKeyframe:
        """Decode one packet: :class:`Decoded`, or :class:`NeedKeyframe` when its
        reference is missing. Raises :class:`ProtocolError` (only) for bad bytes."""
        try:
            return self._decode(as_bytes(packet))
        except ProtocolError:
            self.stats.errors += 1
            raise
        except (ValueError, IndexError, OverflowError, TypeError, MemoryError) as exc:
            # Defence in depth: every malformed input is meant to be refused above.
            self.stats.errors += 1
            raise ProtocolError(f"malformed packet: {exc}") from exc

    def _decode(self, buf: bytes) -> Decoded | NeedKeyframe:
        version, flags, sid, seq, ref_seq, ts_field, pos, end, n, epoch = parse_header(buf)
        if n > self.config.max_poses:
            raise ProtocolError(
                f"{n} poses in a packet, this decoder accepts {self.config.max_poses}"
            )
        keyframe = bool(flags & FLAG_KEYFRAME)
        has_world = bool(flags & FLAG_WORLD)
        st = self._streams.get(sid)
        ref: Entry | None
        if keyframe:
            quant, pos = Quant.parse(buf, pos, end)
            kp = kernel_params(quant)
            ref = None
            ts = ts_field
            step_us = 0
        else:
            assert ref_seq is not None
            ref = st.entries.get(ref_seq) if st is not None else None
            if ref is None or ref.epoch != epoch:
                self.stats.need_keyframe += 1
                return NeedKeyframe(sid, seq, ref_seq)
            quant = ref.quant
            kp = ref.kp
            gap = seq - ref_seq
            d_us = ts_field + ref.step_us * gap
            ts = ref.ts + d_us * 1000
            if not -(2**63) <= ts < 2**63:
                raise ProtocolError("capture timestamp out of range")
            step_us = d_us // gap
        status, aux, hist, image, world = load_kernels().decode_payload(
            buf,
            pos,
            end,
            n,
            has_world,
            kp,
            NO_REF if ref is None else ref.hist,
            -1 if ref is None else ref.n,
            ref is not None and ref.world,
        )
        if status:
            raise ProtocolError(_decode_error(status, aux))
        # the packet is good: update the stream state
        if st is None:
            st = _Stream(epoch)
            self._streams[sid] = st
            while len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(sid)
        if ref is None:
            if epoch != st.epoch:
                st.entries.clear()  # another encoder instance: forget the old frames
                st.epoch = epoch
            elif seq <= st.max_seq:
                # a restarted publisher (or a late keyframe): frames after it may be stale
                for s in [s for s in st.entries if s >= seq]:
                    del st.entries[s]
                st.max_seq = seq
        st.entries.pop(seq, None)
        st.entries[seq] = Entry(
            seq, ts, step_us, epoch, quant, n, hist, has_world,
            seq if ref is None else ref.key_seq, kp,
        )  # fmt: skip
        while len(st.entries) > HISTORY:
            del st.entries[next(iter(st.entries))]
        if seq > st.max_seq:
            st.max_seq = seq
        header = make_header(
            sid,
            seq,
            ts,
            ref_seq,
            keyframe,
            has_world,
            n,
            end - pos,
            version,
            None if keyframe else ts_field,
            pos,
            epoch,
        )
        self.stats.decoded += 1
        return Decoded(PoseFrame(seq, ts, image, world if has_world else None), header)

    def has(self, stream_id: int, seq: int) -> bool:
        """Whether frame ``seq`` of ``stream_id`` was decoded and is still kept (a second
        copy of its packet, e.g. a repair that crossed the original, is a duplicate)."""
        st = self._streams.get(stream_id)
        return st is not None and seq in st.entries

    def ack_for(self, result: Decoded | NeedKeyframe) -> Feedback:
        """The :class:`Feedback` to send back (reliably) for a decode result.

        A decoded frame is acknowledged: the publisher may predict from it after a
        loss. An undecodable packet asks for a refresh; the request names the packet,
        and :meth:`Encoder.on_feedback` ignores requests about packets sent before its
        last keyframe or refresh, so a receiver can send one for every undecodable
        packet (and must: the answer may be lost too).
        """
        if isinstance(result, Decoded):
            return Feedback(result.header.stream_id, ack_seq=result.header.seq)
        return Feedback(result.stream_id, keyframe_request=True, failed_seq=result.seq)

    def forget(self, stream_id: int) -> None:
        """Drop a stream's state (its publisher left)."""
        self._streams.pop(stream_id, None)

    @property
    def streams(self) -> list[int]:
        """Stream ids with state in this decoder."""
        return list(self._streams)
