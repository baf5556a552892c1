"""CUDA kernels compiled at run time with NVRTC, and their torch references; see ops.py."""
