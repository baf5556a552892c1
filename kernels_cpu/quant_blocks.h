// Shared by the quantized GEMM sources: GGUF block layouts, fp16 decoding, small helpers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace rs {

constexpr int QK = 32;
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;  // ggml type ids
// Ours, not a ggml type: 4 bits with an fp16 scale and an integer zero point per 32, value
// (q - z) * d, the AWQ/GPTQ form (z * d in fp16, as Q4_1's m would hold it, is not exact).
constexpr int kQ4_Z = 100;

struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
struct BlockQ8X { float d, s; int8_t qs[32]; };  // a quantized activation block
struct BlockQ4_Z { uint16_t d, z; uint8_t qs[16]; };  // z: 0..16 (GPTQ v1 reads 16)
static_assert(sizeof(BlockQ4_Z) == 20);
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34);

inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      float f = std::ldexp((float)man, -24);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}


constexpr int kTile = 4;  // activation rows sharing one unpacked weight block

inline int64_t block_bytes(int wtype) {
  switch (wtype) {
    case kQ4_0: return sizeof(BlockQ4_0);
    case kQ4_1: return sizeof(BlockQ4_1);
    case kQ8_0: return sizeof(BlockQ8_0);
    case kQ4_Z: return sizeof(BlockQ4_Z);
    default: return 0;
  }
}

// Block b of a weight row: its quantized bytes (Q4: 16 bytes of nibble pairs, low nibbles
// values 0..15, high ones 16..31; Q8_0: 32 int8), scale and offset, so that value i is
// q_i * d + offset (Q4_0: (q - 8) * d, whose offset -8d enters the same way).
template <int WType>
inline const uint8_t* block_fields(const uint8_t* w, int64_t b, float& dw, float& offset) {
  if constexpr (WType == kQ4_0) {
    const BlockQ4_0* wb = (const BlockQ4_0*)w + b;
    dw = fp16_to_fp32(wb->d), offset = -8.0f * dw;
    return wb->qs;
  } else if constexpr (WType == kQ4_1) {
    const BlockQ4_1* wb = (const BlockQ4_1*)w + b;
    dw = fp16_to_fp32(wb->d), offset = fp16_to_fp32(wb->m);
    return wb->qs;
  } else if constexpr (WType == kQ4_Z) {
    // z * d is exact in fp32 (at most 4 + 11 significant bits), so is q * d + offset.
    const BlockQ4_Z* wb = (const BlockQ4_Z*)w + b;
    dw = fp16_to_fp32(wb->d), offset = -(float)wb->z * dw;
    return wb->qs;
  } else {
    const BlockQ8_0* wb = (const BlockQ8_0*)w + b;
    dw = fp16_to_fp32(wb->d), offset = 0.0f;
    return (const uint8_t*)wb->qs;
  }
}

// The 32 quantized values of block b as floats (q, not yet scaled), in order.
template <int WType>
inline void widen_block_scalar(const uint8_t* w, int64_t b, float q[32], float& dw,
                               float& offset) {
  const uint8_t* qs = block_fields<WType>(w, b, dw, offset);
  if constexpr (WType == kQ8_0) {
    for (int i = 0; i < QK; ++i) q[i] = (float)(int8_t)qs[i];
  } else {
    for (int i = 0; i < 16; ++i) q[i] = (float)(qs[i] & 0x0f), q[i + 16] = (float)(qs[i] >> 4);
  }
}

#if defined(__AVX2__)
// The same, as four vectors of 8 (values 0-7, 8-15, 16-23, 24-31).
template <int WType>
inline void widen_block(const uint8_t* w, int64_t b, __m256 q[4], float& dw, float& offset) {
  const uint8_t* qs = block_fields<WType>(w, b, dw, offset);
  if constexpr (WType == kQ8_0) {
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qs + 8 * i))));
    }
  } else {
    // Bytes widened straight from memory to 32-bit lanes; a lane's low nibble is value i,
    // its high nibble value i + 16.
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)qs));
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qs + 8)));
    const __m256i mask = _mm256_set1_epi32(0x0f);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask));
    q[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
  }
}
#endif

#if defined(__AVX2__)
// Block b of a weight row dequantized as dequant_row does (the same fp32 values), as four
// vectors of 8 (values 0-7, 8-15, 16-23, 24-31).
template <int WType>
inline void dequant_block8x4(const uint8_t* w, int64_t b, __m256 v[4]) {
  float dw, offset;
  widen_block<WType>(w, b, v, dw, offset);
  const __m256 vd = _mm256_set1_ps(dw), voff = _mm256_set1_ps(offset);
  for (int i = 0; i < 4; ++i) {
    // Q4_0's (q - 8) * d is exact either way: q - 8 is a small integer in fp32.
    v[i] = WType == kQ4_0 ? _mm256_mul_ps(_mm256_sub_ps(v[i], _mm256_set1_ps(8.0f)), vd)
                          : _mm256_add_ps(_mm256_mul_ps(v[i], vd), voff);
  }
}
#endif

// Dequantized values of one weight row of k (k / 32 blocks): q * d + offset, rounded as
// gguf's reference dequantizer does (a product, then a sum: no fused multiply-add).
template <int WType>
inline void dequant_row(const uint8_t* w, int64_t k, float* out) {
  for (int64_t b = 0; b < k / QK; ++b) {
    float* o = out + b * QK;
#if defined(__AVX2__)
    __m256 v[4];
    dequant_block8x4<WType>(w, b, v);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, v[i]);
#else
    float dw, offset;
    float q[32];
    widen_block_scalar<WType>(w, b, q, dw, offset);
    for (int i = 0; i < QK; ++i) o[i] = WType == kQ4_0 ? (q[i] - 8.0f) * dw : q[i] * dw + offset;
#endif
  }
}

// n floats rounded to bf16, to nearest even (torch's float -> bfloat16 for finite values).
inline void fp32_to_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  for (; i + 16 <= n; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm256_storeu_si256((__m256i*)(out + i), (__m256i)v);
  }
#endif
  for (; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    out[i] = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}

#if defined(__AVX512F__)
// Block b of a weight row dequantized as dequant_row does (the same fp32 values): values
// 0-15 in lo, 16-31 in hi.
template <int WType>
inline void dequant_block16x2(const uint8_t* w, int64_t b, __m512& lo, __m512& hi) {
  float dw, offset;
  const uint8_t* qs = block_fields<WType>(w, b, dw, offset);
  const __m512 vd = _mm512_set1_ps(dw);
  if constexpr (WType == kQ8_0) {
    const __m128i q0 = _mm_loadu_si128((const __m128i*)qs);
    const __m128i q1 = _mm_loadu_si128((const __m128i*)(qs + 16));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), vd);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), vd);
  } else {
    // A 4-bit block has 16 possible values: the block's table of them (q = 0..15, computed
    // as dequant_row computes each value), then a lookup per value (vpermps reads an index's
    // low 4 bits only, so a byte widened to a lane indexes by its low nibble as it is): 6
    // vector instructions a block where converting and scaling each value took 10.
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 table;
    if constexpr (WType == kQ4_0) {
      table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0f)), vd);
    } else {  // a product, then a sum, as dequant_row (no fused multiply-add)
      table = _mm512_add_ps(_mm512_mul_ps(iota, vd), _mm512_set1_ps(offset));
    }
    // 16 bytes, a lane each: low nibbles values 0-15, high ones 16-31
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
    lo = _mm512_permutexvar_ps(bytes, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
  }
}

// The first n of 16 lanes (none for n <= 0, all for n >= 16): a masked store's mask for the
// valid columns of a 16-wide tile.
inline __mmask16 first_lanes(int64_t n) {
  return n <= 0 ? (__mmask16)0 : n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

// r[i] lane j -> r[j] lane i, 32-bit lanes.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

#endif

// Ask for bytes [p, p + n) (a panel's weight rows, contiguous) ahead of a packer that reads
// them block by block across 16-32 rows: from DRAM (a step's weights are far larger than the
// caches) those reads otherwise wait on each row's lines in turn (2 threads, the model's
// bf16 GEMMs at 32 rows over 30 layers' own weights: 202-238 -> 239-250 GF/s).
inline void prefetch_bytes(const void* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch((const char*)p + o, 0, 3);
}

// fn(std::integral_constant<int, r>{}) for a runtime r in [1, Max] (a kernel's row count as
// a template argument, so its accumulators stay in registers).
template <int Max, class Fn>
inline void with_rows(int r, Fn&& fn) {
  if constexpr (Max > 1) {
    if (r < Max) return with_rows<Max - 1>(r, fn);
  }
  fn(std::integral_constant<int, Max>{});
}

// Rows [0, m) in passes of at most Max rows, as even as they go (32 rows of at most 12:
// 11 11 10, not 12 12 8, whose last pass runs at two thirds of the rate):
// fn(std::integral_constant<int, rows>{}, first row) per pass.
template <int Max, class Fn>
inline void even_passes(int64_t m, Fn&& fn) {
  const int64_t passes = (m + Max - 1) / Max;
  if (passes == 0) return;
  const int64_t base = m / passes, extra = m % passes;
  for (int64_t p = 0, i = 0; p < passes; ++p) {
    const int rows = (int)(base + (p < extra ? 1 : 0));
    with_rows<Max>(rows, [&](auto tag) { fn(tag, i); });
    i += rows;
  }
}

// Output rows [begin, end) in chunks of `chunk`; fn(r0, r1) per chunk. Guided: a thread's
// first chunks are a run of neighbouring ones (half the rows, then a quarter...), the last
// ones are handed out one at a time, so a thread that loses its core for a time slice holds
// up little of the product. Chunks handed out in turn (dynamic) interleaved the threads'
// weight rows 16 at a time, which cut each thread's stream into pieces the hardware
// prefetchers kept restarting on: a one-row product over 180,000 Q4_1 rows of 576 (the
// model's 30 layers' worth), 2 threads, 6.6 ms dynamic against 3.9 ms with each thread's
// rows in one run. A row's result is one thread's work either way, so it does not depend on
// the thread count. Chunks of 16 or more rows keep neighbouring threads off each other's
// cache lines of y.
template <class Fn>
inline void for_row_chunks(int64_t begin, int64_t end, int64_t chunk, int nthreads, bool parallel,
                           Fn&& fn) {
#pragma omp parallel for num_threads(nthreads) schedule(guided) if (parallel)
  for (int64_t r0 = begin; r0 < end; r0 += chunk) fn(r0, r0 + chunk < end ? r0 + chunk : end);
}

// fn(std::integral_constant<int, WType>{}) for a runtime ggml type id: 0, or 2 for a type the
// kernels do not take (the C entry points' return codes).
template <class Fn>
inline int with_wtype(int wtype, Fn&& fn) {
  switch (wtype) {
    case kQ4_0: fn(std::integral_constant<int, kQ4_0>{}); return 0;
    case kQ4_1: fn(std::integral_constant<int, kQ4_1>{}); return 0;
    case kQ8_0: fn(std::integral_constant<int, kQ8_0>{}); return 0;
    case kQ4_Z: fn(std::integral_constant<int, kQ4_Z>{}); return 0;
    default: return 2;
  }
}

// Whether a product of m rows over an n x k weight is worth waking a second thread for (tens
// of microseconds on a busy machine).
inline bool worth_threads(int64_t n, int64_t k, int64_t m, int nthreads) {
  return nthreads > 1 && n * k * (m < 4 ? m : 4) >= (1 << 18);
}

}  // namespace rs
