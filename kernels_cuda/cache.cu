// Writes the new tokens' keys and values into the paged KV cache.
//
// Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim] for K and V
// separately; a token's slot is block_id * block_size + offset, and slot -1 marks padding.
#include "common.cuh"

// One block per token; each thread copies 16-byte vectors of the token's K and V rows.
extern "C" __global__ void __launch_bounds__(256) reshape_and_cache(
    const scalar_t* __restrict__ key,        // [num_tokens, num_kv_heads, head_dim]
    const scalar_t* __restrict__ value,      // [num_tokens, num_kv_heads, head_dim]
    scalar_t* __restrict__ k_cache,          // [num_blocks, block_size, num_kv_heads, head_dim]
    scalar_t* __restrict__ v_cache,
    const long long* __restrict__ slot_mapping,  // [num_tokens]
    long long key_stride,                    // elements between tokens of key
    long long value_stride,
    int row_vecs,                            // num_kv_heads * head_dim / VEC
    long long num_slots) {                   // num_blocks * block_size
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  // Out-of-range slots cannot raise here; skipping them at least keeps other memory intact.
  if (slot < 0 || slot >= num_slots) return;
  const uint4* k_src = reinterpret_cast<const uint4*>(key + token * key_stride);
  const uint4* v_src = reinterpret_cast<const uint4*>(value + token * value_stride);
  uint4* k_dst = reinterpret_cast<uint4*>(k_cache + slot * row_vecs * VEC);
  uint4* v_dst = reinterpret_cast<uint4*>(v_cache + slot * row_vecs * VEC);
  for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    const uint4 k = k_src[i];
    const uint4 v = v_src[i];
    k_dst[i] = k;
    v_dst[i] = v;
  }
}
