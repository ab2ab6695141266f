"""Compression algorithms: product quantization (k-means), clipping + uniform quantization, bit packing."""
