// Rotary position embedding, neox style (the Llama / HF rotate_half layout), in place.
#include "common.cuh"

// One block per token. For each head, dims i and i + rot_dim/2 (i < rot_dim/2) rotate by
// the angle cached for the token's position; dims past rot_dim are left alone.
// A position outside [0, max_position) writes NaN so that the bad input shows.
extern "C" __global__ void __launch_bounds__(256) rotary_embedding_neox(
    const long long* __restrict__ positions,  // [num_tokens]
    scalar_t* __restrict__ query,             // [num_tokens, num_q_heads, head_dim]
    scalar_t* __restrict__ key,               // [num_tokens, num_kv_heads, head_dim] or nullptr
    const float* __restrict__ cos_cache,      // [max_position, rot_dim / 2], rows cos_stride apart
    const float* __restrict__ sin_cache,
    long long cos_stride, long long sin_stride, long long max_position,
    int num_q_heads, int num_kv_heads, int head_dim, int rot_half,
    long long query_stride, long long key_stride) {
  const long long token = blockIdx.x;
  const long long pos = positions[token];
  const bool bad = pos < 0 || pos >= max_position;
  const float* cos_row = cos_cache + (bad ? 0 : pos) * cos_stride;
  const float* sin_row = sin_cache + (bad ? 0 : pos) * sin_stride;
  const int total = (num_q_heads + (key ? num_kv_heads : 0)) * rot_half;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int head = i / rot_half;
    const int j = i - head * rot_half;
    scalar_t* x = head < num_q_heads
                      ? query + token * query_stride + head * head_dim
                      : key + token * key_stride + (head - num_q_heads) * head_dim;
    const float c = bad ? __int_as_float(0x7fffffff) : cos_row[j];
    const float s = bad ? __int_as_float(0x7fffffff) : sin_row[j];
    const float x1 = to_float(x[j]);
    const float x2 = to_float(x[j + rot_half]);
    x[j] = from_float<scalar_t>(x1 * c - x2 * s);
    x[j + rot_half] = from_float<scalar_t>(x2 * c + x1 * s);
  }
}
