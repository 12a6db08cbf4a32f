"""Triton kernels, installed as `calft.kernels`. One kernel family per file."""
