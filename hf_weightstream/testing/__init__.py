"""Tools for tests, benchmarks and offline demos; nothing in the streaming path imports them.

``checkpoints.py`` writes tiny pre-quantized checkpoints to each format's published layout (FP8, MXFP4,
compressed-tensors), for tests and benchmarks that need real quantized files.
"""
