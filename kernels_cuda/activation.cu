// SiLU-and-mul, the gate of Llama-style MLPs: out = silu(x[:, :I]) * x[:, I:].
#include "common.cuh"

// Grid (num_tokens, ceil(I / VEC / blockDim.x)); each thread handles one 16-byte vector.
extern "C" __global__ void __launch_bounds__(256) silu_and_mul(
    scalar_t* __restrict__ out,      // [num_tokens, I]
    const scalar_t* __restrict__ x,  // [num_tokens, 2 * I]
    int inter,                       // I
    long long out_stride, long long x_stride) {
  const long long token = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= inter / VEC) return;
  float gate[VEC], up[VEC];
  load_vec(x + token * x_stride + i * VEC, gate);
  load_vec(x + token * x_stride + inter + i * VEC, up);
#pragma unroll
  for (int k = 0; k < VEC; ++k) gate[k] = gate[k] / (1.f + __expf(-gate[k])) * up[k];
  store_vec(out + token * out_stride + i * VEC, gate);
}
