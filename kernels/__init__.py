"""Triton kernels, each with a plain-torch reference; installed as `specdec.kernels`."""
