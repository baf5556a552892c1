"""CPU kernels of our own (C++ built with g++ at install or first use): quantized GEMM."""
