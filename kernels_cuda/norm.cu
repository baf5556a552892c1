// RMSNorm, alone or fused with the residual add that precedes it.
#include "common.cuh"

// Vectors each thread keeps in registers: with 1024 threads, rows up to 32768 elements.
constexpr int NORM_VECS_PER_THREAD = 4;

// One block per token. With `residual` non-null: residual += x, out = rmsnorm(residual) *
// weight; else out = rmsnorm(x) * weight. `out` may be `x` (in place). The row stays in
// registers between the sum of squares and the output, so both use the same fp32 sum.
extern "C" __global__ void __launch_bounds__(1024) rms_norm(
    scalar_t* out,                        // [num_tokens, hidden]
    const scalar_t* x,                    // [num_tokens, hidden]
    scalar_t* __restrict__ residual,      // [num_tokens, hidden] or nullptr
    const scalar_t* __restrict__ weight,  // [hidden]
    int hidden,
    long long out_stride, long long x_stride, long long residual_stride,
    float eps) {
  __shared__ float scratch[32];
  const long long token = blockIdx.x;
  const int row_vecs = hidden / VEC;
  const scalar_t* x_row = x + token * x_stride;
  scalar_t* r_row = residual ? residual + token * residual_stride : nullptr;
  float v[NORM_VECS_PER_THREAD][VEC];
  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < NORM_VECS_PER_THREAD; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < row_vecs) {
      load_vec(x_row + i * VEC, v[j]);
      if (r_row) {
        float r[VEC];
        load_vec(r_row + i * VEC, r);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[j][k] += r[k];
        store_vec(r_row + i * VEC, v[j]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum_sq += v[j][k] * v[j][k];
    }
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
  scalar_t* out_row = out + token * out_stride;
#pragma unroll
  for (int j = 0; j < NORM_VECS_PER_THREAD; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < row_vecs) {
      float w[VEC];
      load_vec(weight + i * VEC, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[j][k] = v[j][k] * inv_rms * w[k];
      store_vec(out_row + i * VEC, v[j]);
    }
  }
}
