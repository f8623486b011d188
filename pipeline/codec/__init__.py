"""The wire codec: packet header and framing, the pose codec, its compiled kernels."""
