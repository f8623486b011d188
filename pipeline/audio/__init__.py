"""Audio beside the pose: sources, Opus, the receiver's jitter buffer and playout.

* :mod:`~pipeline.audio.sources`: the audio stage's sources (``tone``, ``file``,
  ``speech``, ``microphone``), 20 ms of 48 kHz mono PCM at a time, paced;
* :mod:`~pipeline.audio.opus`: the Opus encoder (PyAV's libopus) and decoder (libopus
  through ctypes: in-band FEC and packet-loss concealment, which PyAV does not reach);
* :mod:`~pipeline.audio.playout`: the receiver's adaptive jitter buffer, playout clock,
  WAV writer, and the pose/audio skew.

The packet format is :mod:`pipeline.codec.audio`. Only the audio stage and a receiver
asked for audio import PyAV (never beside cv2: they bundle different FFmpeg builds).
"""
