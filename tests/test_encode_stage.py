"""The encode stage's guard between detector output and the codec."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.codec import CodecConfig, Decoded, Decoder, Encoder
from pipeline.errors import ProtocolError
from pipeline.model.pose import PoseFrame
from stages.encode import clamp_to_codec_range


def _frame(seq: int) -> PoseFrame:
    rng = np.random.default_rng(seq)
    image = rng.uniform(0.2, 0.8, (1, 33, 4)).astype(np.float32)
    return PoseFrame(seq=seq, capture_ts_ns=1_700_000_000_000_000_000 + seq, image=image)


def test_out_of_range_landmarks_are_clamped_and_still_encode() -> None:
    frame = _frame(1)
    frame.image[0, 29, 1] = 2.01  # a hidden heel below a small frame, as MediaPipe reports it
    frame.image[0, 0, 2] = -7.5
    with pytest.raises(ProtocolError):
        Encoder(CodecConfig(), 7).encode(_copy(frame))
    assert clamp_to_codec_range(frame) == 2
    packet = Encoder(CodecConfig(), 7).encode(frame)
    out = Decoder().decode(packet)
    assert isinstance(out, Decoded)
    assert out.frame.image[0, 29, 1] == pytest.approx(2.0, abs=3e-4)
    assert out.frame.image[0, 0, 2] == pytest.approx(-4.0, abs=0.02)


def test_in_range_frames_are_untouched_and_nan_is_still_refused() -> None:
    frame = _frame(2)
    before = frame.image.copy()
    assert clamp_to_codec_range(frame) == 0
    assert np.array_equal(frame.image, before)
    frame.image[0, 5, 0] = np.nan
    clamp_to_codec_range(frame)
    with pytest.raises(ProtocolError):
        Encoder(CodecConfig(), 7).encode(frame)


def _copy(frame: PoseFrame) -> PoseFrame:
    return PoseFrame(frame.seq, frame.capture_ts_ns, frame.image.copy())


def test_read_only_frames_are_clamped_into_a_copy() -> None:
    frame = _frame(3)
    frame.image[0, 29, 1] = 2.01
    frame.image.flags.writeable = False
    original = frame.image
    assert clamp_to_codec_range(frame) == 1
    assert frame.image is not original and frame.image.flags.writeable
    assert original[0, 29, 1] == np.float32(2.01)  # the ring's bytes are not written
    assert frame.image[0, 29, 1] == np.float32(2.0)
    untouched = _frame(4)
    untouched.image.flags.writeable = False
    kept = untouched.image
    assert clamp_to_codec_range(untouched) == 0
    assert untouched.image is kept
