// Decode attention over the paged KV cache, read in place (no gather into a contiguous copy).
//
// One query token a row; K/V pools [num_blocks, block_size, kv_heads, head_dim], fp32 or bf16
// (a bf16 pool's values widened to fp32 as they are read: half the bytes, the same math on
// the rounded values; the vector path only); a row's
// token t lives at block_table[row][t / block_size], slot t % block_size. The mask is the
// caller's additive bias [rows, width * block_size] (0 or -inf), the same one torch's masked
// SDPA takes, so both paths attend to exactly the same keys. Threads split the (row, KV head)
// pairs; each pair runs over the row's keys up to its last unmasked one, in two passes:
// scores for the head's query heads, then a softmax-weighted sum of the values. A lone row
// of 64+ keys (AVX-512) runs as two ranges of its keys merged by their softmax maxima and
// sums (attend_row_part), so two threads share it evenly.
// With AVX-512 and head_dim % 16 == 0, up to 6 query heads a KV head (attend_heads512):
// four keys a round, each key's row read once for all the group's heads, and a value row
// once for the whole head_dim (32 rows x 320 keys, 9 heads over 3, 2 threads, cache-resident:
// 0.24 -> 0.20 ms fp32, 0.21 -> 0.16 ms bf16 against the 8-lane kernel). Threads take whole
// rows where they can, and a row's KV heads then run as one task (attend_heads), reading each
// token's K and V rows of all KV heads, contiguous in the pools, in one stream (32 rows x
// 100-600 keys, bf16, 9 heads over 3, 30 layers' own pools, 2 threads: 23.7-25.2 -> 17-19 ms
// over blocks in order; the model's 32-row bf16 decode step at 336 keys, 62-63 -> 51-59 ms).
// Over a bf16 pool on a CPU with AMX, the scores of shapes that fit run on tiles instead
// (attend_heads_amx: the queries rounded to bf16, 16 keys x up to 16 query heads a tile op);
// on a CPU with AVX512-BF16 and no AMX, by vdpbf16ps (attend_heads512's DP: the queries
// rounded to bf16, the keys multiplied as they are in the pool, 32 dims an instruction).
// With AVX2 and head_dim % 8 == 0 (attend_group): scores eight keys at a time (independent
// FMA chains, reduced together), every query head of the group on each value row, and the
// keys and values a few rows ahead prefetched: a pair's part of a token's row is a 256-byte
// stretch every kv_heads * head_dim floats, which the hardware prefetchers follow poorly
// (32 rows x 320 keys, 9 heads over 3: 1.49 -> 0.65 ms on one thread). Otherwise the plain
// loops below.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "panel_kernels.h"
#include "simd.h"

using namespace rs;

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// s[t] = exp(s[t] - mx) (a masked score, -inf, gives 0); returns the sum.
inline float exp_and_sum(float* s, int64_t n, float mx) {
  int64_t t = 0;
  float sum = 0.0f;
#if defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
  for (; t + 8 <= n; t += 8) {
    const __m256 v = _mm256_loadu_ps(s + t);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(v, vmx)));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; t < n; ++t) {
    s[t] = std::isinf(s[t]) ? 0.0f : std::exp(s[t] - mx);
    sum += s[t];
  }
  return sum;
}

// o[d] = inv * sum_t p[t] * v_t[d] over the context's value rows (walked block by block), for
// one query head: the sums stay in registers, 32 lanes of head_dim at a time.
inline void weighted_values(const float* p, const float* v_cache, const int64_t* bt, int64_t width,
                            int64_t block_size, int64_t slot_stride, int64_t head_offset,
                            int64_t head_dim, float inv, float* o) {
  int64_t d0 = 0;
#if defined(__AVX2__)
  for (; d0 + 32 <= head_dim; d0 += 32) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < width; ++b) {
      const float* vb = v_cache + bt[b] * block_size * slot_stride + head_offset + d0;
      for (int64_t i = 0; i < block_size; ++i) {
        const float pt = p[b * block_size + i];
        if (pt == 0.0f) continue;
        const __m256 vp = _mm256_set1_ps(pt);
        const float* vt = vb + i * slot_stride;
        for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(vp, _mm256_loadu_ps(vt + 8 * c), acc[c]);
      }
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + d0 + 8 * c, _mm256_mul_ps(acc[c], vinv));
  }
#endif
  for (int64_t d = d0; d < head_dim; ++d) o[d] = 0.0f;
  if (d0 == head_dim) return;
  for (int64_t b = 0; b < width; ++b) {
    const float* vb = v_cache + bt[b] * block_size * slot_stride + head_offset;
    for (int64_t i = 0; i < block_size; ++i) {
      const float pt = p[b * block_size + i];
      if (pt == 0.0f) continue;
      const float* vt = vb + i * slot_stride;
      for (int64_t d = d0; d < head_dim; ++d) o[d] += pt * vt[d];
    }
  }
  for (int64_t d = d0; d < head_dim; ++d) o[d] *= inv;
}

#if defined(__AVX2__)
// Rows [begin, min(end, n)) of a pool (row i: `bytes` from pool + off[i]) asked for into L2
// (_MM_HINT_T1), a cache line at a time.
template <class T>
inline void prefetch_rows(const T* pool, const int64_t* off, int64_t begin, int64_t end,
                          int64_t n, int64_t bytes) {
  for (int64_t i = begin; i < end && i < n; ++i) {
    const char* p = (const char*)(pool + off[i]);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  }
}

// Eight 8-lane partial sums -> one vector of their eight totals (lane i: a[i]'s total).
inline __m256 reduce8(const __m256* a) {
  const __m256 h0 = _mm256_hadd_ps(a[0], a[1]), h1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h2 = _mm256_hadd_ps(a[4], a[5]), h3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h01 = _mm256_hadd_ps(h0, h1), h23 = _mm256_hadd_ps(h2, h3);
  return _mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20),
                       _mm256_permute2f128_ps(h01, h23, 0x31));
}

// Eight cache values as fp32: a float pool's as they are, a bf16 pool's (uint16 bits)
// widened exactly (bf16 is fp32's upper half).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// One (row, KV head) task for G query heads of head_dim % 8 == 0, over the row's first n keys
// (those past its last unmasked one are left out); off[t]: where key t's part of this head
// starts in either pool (floats), worked out once a task by the caller instead of a division
// by block_size at every key (64-bit divisions were most of this kernel's time). Scores:
// eight keys at a time for one query head (eight independent FMA chains, their sums reduced
// together); values: every query head of the group on each value row, CW vectors of head_dim
// at a time (G * CW accumulators).
template <int G, class T>
void attend_group(const float* qh, const T* k_cache, const T* v_cache, const int64_t* off,
                  const float* brow, int64_t n, int64_t head_dim, float scale, float* s,
                  int64_t ctx, float* o) {
  constexpr int CW = G <= 3 ? 4 : (G <= 5 ? 2 : 1);  // G * CW + G + 1 <= 16 registers
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t t0 = 0; t0 < n; t0 += 8) {
    const int valid = (int)(n - t0 < 8 ? n - t0 : 8);
    const T* kp[8];
    for (int i = 0; i < 8; ++i) kp[i] = k_cache + off[t0 + (i < valid ? i : valid - 1)];
    // The keys six rounds ahead: blocks sit anywhere in the pool, and a head's part of a
    // token's K row is a 256-byte stretch of every slot_stride, which the hardware
    // prefetchers follow poorly; DRAM's latency wants the distance (an AVX2 build, 32 rows
    // x 320 keys over 30 layers' bf16 pools: 18.1 -> 13.5 ms against two rounds).
    prefetch_rows(k_cache, off, t0 + 48, t0 + 56, n, head_dim * (int64_t)sizeof(T));
    for (int j = 0; j < G; ++j) {
      const float* qj = qh + j * head_dim;
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < head_dim; d += 8) {
        const __m256 qd = _mm256_loadu_ps(qj + d);
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qd, load8(kp[i] + d), acc[i]);
      }
      float* sj = s + j * ctx + t0;
      if (valid == 8) {
        _mm256_storeu_ps(sj, _mm256_fmadd_ps(reduce8(acc), vscale, _mm256_loadu_ps(brow + t0)));
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, reduce8(acc));
        for (int i = 0; i < valid; ++i) sj[i] = tmp[i] * scale + brow[t0 + i];
      }
    }
  }
  float inv[G];
  for (int j = 0; j < G; ++j) {
    float* sj = s + j * ctx;
    int64_t t = 0;
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(sj + t));
    alignas(32) float m8[8];
    _mm256_store_ps(m8, vmx);
    float mx = -INFINITY;
    for (int i = 0; i < 8; ++i) mx = m8[i] > mx ? m8[i] : mx;
    for (; t < n; ++t) mx = sj[t] > mx ? sj[t] : mx;
    const float sum = exp_and_sum(sj, n, mx);
    inv[j] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  // Values, CW vectors of head_dim a pass over the keys (then single vectors for a rest):
  // the accumulators' count a compile-time constant, so they stay in registers.
  auto values = [&](auto cw_tag, int64_t d0) {
    constexpr int W = decltype(cw_tag)::value;
    __m256 acc[G][W];
    for (int j = 0; j < G; ++j)
      for (int c = 0; c < W; ++c) acc[j][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const T* vt = v_cache + off[t] + d0;
      prefetch_rows(v_cache + d0, off, t + 32, t + 33, n, W * 8 * (int64_t)sizeof(T));
      __m256 p[G];
      for (int j = 0; j < G; ++j) p[j] = _mm256_broadcast_ss(s + j * ctx + t);
      for (int c = 0; c < W; ++c) {
        const __m256 vv = load8(vt + 8 * c);
        for (int j = 0; j < G; ++j) acc[j][c] = _mm256_fmadd_ps(p[j], vv, acc[j][c]);
      }
    }
    for (int j = 0; j < G; ++j) {
      const __m256 vinv = _mm256_set1_ps(inv[j]);
      for (int c = 0; c < W; ++c) _mm256_storeu_ps(o + j * head_dim + d0 + 8 * c, _mm256_mul_ps(acc[j][c], vinv));
    }
  };
  int64_t d0 = 0;
  for (; d0 + 8 * CW <= head_dim; d0 += 8 * CW) values(std::integral_constant<int, CW>{}, d0);
  for (; d0 < head_dim; d0 += 8) values(std::integral_constant<int, 1>{}, d0);
}

#if defined(__AVX512F__)
// Sixteen cache values as fp32 (see load8).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// The totals of four 16-lane partial sums, as one 4-lane vector (lane i: a[i]'s total).
inline __m128 reduce4(const __m512* a) {
  __m256 h[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 upper = _mm512_shuffle_f32x4(a[i], a[i], 0x0e);  // lanes 8-15 down
    h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm512_castps512_ps256(upper));
  }
  const __m256 h01 = _mm256_hadd_ps(h[0], h[1]), h23 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 all = _mm256_hadd_ps(h01, h23);  // lanes 0-3 and 4-7: halves of the four
  return _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
}

// attend_group with 16-lane vectors, for head_dim % 16 == 0. Scores: four keys at a time,
// each key's row loaded (and, from a bf16 pool, widened) once for every query head of the
// group, G x 4 accumulators reduced four at a time. Values: the group's whole head_dim in
// registers (G x head_dim / 16 accumulators, up to 24), so each value row is read once.
constexpr int64_t kMaxRowHeads = 64;  // query heads of one row's task (attend_heads)
// How far ahead of the kernel's reads its prefetches go, in bytes of the pools: far enough
// for DRAM's latency, near enough for the caches' outstanding misses (the pools of a step's
// 30 layers are far larger than the caches; 32 rows x 100-600 keys, bf16, 9 heads over 3,
// all layers, 2 threads, a row's KV heads in one task: keys 6, 9, 12 and 18 KB ahead took
// 17.2-17.7, 17.4-17.9, 17.5-18.0 and 19.2-21.3 ms over blocks in order, 21.7-22.8,
// 22.2-22.3, 23.3-24.7 and 26.8-27.1 ms over shuffled blocks; values 2-12 KB ahead, all
// within the noise). A task of one KV head over a bf16 pool (128-byte rows) fetches 48 keys
// and 32 values ahead, as before; over a fp32 pool the same bytes, half as many tokens.
// The prefetches fill L2 (_MM_HINT_T1), not L1: they then wait on L2's many outstanding
// misses, not on L1's few fill buffers (the same pools, one process calling the builds in
// turn: 16.4 -> 14.6 ms over blocks in order, 22.1 -> 16.8 ms over shuffled ones; an AVX2
// build's attend_group on this AVX-512 machine 38.9 -> 26.6 and 26.1 -> 18.1 ms; 3, 12 and
// 24 KB ahead with T1 all within the noise of 6).
constexpr int64_t kKeysAheadBytes = 6144;
constexpr int64_t kValuesAheadBytes = 4096;

// Each query head's output over its KV head's value rows, o[h] = inv[h] * sum_t p(h, t) v_t,
// for the `groups` KV heads of G query heads each: p(h, t) = p[h * head_stride + t *
// key_stride] (attend_heads512 keeps a head's scores in a row, attend_heads_amx a key's).
// The group's whole head_dim in registers (G x W accumulators, up to 24), so each value row
// is read once; the first pass fetches every group's part of each row, v_ahead rows ahead
// (the later groups' passes then read it from the caches).
template <int G, class T>
void weighted_values512(const T* v_cache, const int64_t* off, int64_t n, int64_t groups,
                        int64_t head_dim, const float* p, int64_t head_stride, int64_t key_stride,
                        const float* inv, int64_t v_ahead, int64_t row_bytes, float* o) {
  auto values = [&](auto cw_tag, int64_t g, int64_t d0) {
    constexpr int W = decltype(cw_tag)::value;
    const bool fetch = g == 0 && d0 == 0;
    __m512 acc[G][W];
    for (int j = 0; j < G; ++j)
      for (int c = 0; c < W; ++c) acc[j][c] = _mm512_setzero_ps();
    const float* pg = p + g * G * head_stride;
    for (int64_t t = 0; t < n; ++t) {
      const T* vt = v_cache + off[t] + g * head_dim + d0;
      if (fetch) prefetch_rows(v_cache, off, t + v_ahead, t + v_ahead + 1, n, row_bytes);
      __m512 vv[W];
      for (int c = 0; c < W; ++c) vv[c] = load16(vt + 16 * c);
      const float* pt = pg + t * key_stride;
      for (int j = 0; j < G; ++j) {
        const __m512 pj = _mm512_set1_ps(pt[j * head_stride]);
        for (int c = 0; c < W; ++c) acc[j][c] = _mm512_fmadd_ps(pj, vv[c], acc[j][c]);
      }
    }
    for (int j = 0; j < G; ++j) {
      const __m512 vinv = _mm512_set1_ps(inv[g * G + j]);
      float* oj = o + (g * G + j) * head_dim + d0;
      for (int c = 0; c < W; ++c) _mm512_storeu_ps(oj + 16 * c, _mm512_mul_ps(acc[j][c], vinv));
    }
  };
  // G * W accumulators + W value vectors + a broadcast within 32 registers.
  constexpr int CW = G <= 3 ? 4 : (G <= 5 ? 2 : 1);
  for (int64_t g = 0; g < groups; ++g) {
    int64_t d0 = 0;
    for (; d0 + 16 * CW <= head_dim; d0 += 16 * CW) values(std::integral_constant<int, CW>{}, g, d0);
    for (; d0 < head_dim; d0 += 16) values(std::integral_constant<int, 1>{}, g, d0);
  }
}

// stats (null: not wanted): each query head's softmax max and sum, [heads][2], for a caller
// that merges this result with another range of the same row's keys (attend_row_part).
// DP (a bf16 pool, head_dim % 32 == 0, an AVX512-BF16 build): the scores by vdpbf16ps on the
// queries rounded to bf16 and the keys as they are in the pool, 32 dims an instruction, where
// the fp32 path widens each key (two instructions a 16 dims) and runs an FMA per 16 dims and
// query head; the softmax and the values as without.
template <int G, class T, bool DP = false>
void attend_heads512(const float* qh, const T* k_cache, const T* v_cache, const int64_t* off,
                     int64_t groups, const float* brow, int64_t n, int64_t head_dim, float scale,
                     float* s, int64_t ctx, float* o, float* stats) {
  constexpr int KB = 4;  // keys a round: G * 4 accumulators + 4 key vectors + 1 query
  [[maybe_unused]] const uint16_t* qb = nullptr;  // DP: the task's queries rounded to bf16
#if defined(__AVX512BF16__)
  if constexpr (DP) {
    static thread_local AlignedVector<uint16_t> qbuf;
    if ((int64_t)qbuf.size() < groups * G * head_dim) qbuf.resize(groups * G * head_dim);
    rs::fp32_to_bf16(qh, groups * G * head_dim, qbuf.data());
    qb = qbuf.data();
  }
#else
  static_assert(!DP, "bf16 products need an AVX512-BF16 build");
#endif
  // A token's rows of the `groups` KV heads, contiguous in the pools.
  const int64_t row_bytes = groups * head_dim * (int64_t)sizeof(T);
  // Keys and values fetched this many tokens ahead (a whole number of rounds).
  const int64_t k_ahead = std::max<int64_t>(KB, kKeysAheadBytes / row_bytes / KB * KB);
  const int64_t v_ahead = std::max<int64_t>(1, kValuesAheadBytes / row_bytes);
  // The first keys the loop's own prefetches do not reach, asked for before it starts.
  prefetch_rows(k_cache, off, 0, k_ahead, n, row_bytes);
  for (int64_t t0 = 0; t0 < n; t0 += KB) {
    const int valid = (int)(n - t0 < KB ? n - t0 : KB);
    prefetch_rows(k_cache, off, t0 + k_ahead, t0 + k_ahead + KB, n, row_bytes);
    for (int64_t g = 0; g < groups; ++g) {
      const T* kp[KB];
      for (int i = 0; i < KB; ++i) kp[i] = k_cache + off[t0 + (i < valid ? i : valid - 1)] + g * head_dim;
      const float* qg = qh + g * G * head_dim;
      __m512 acc[G][KB];
      for (int j = 0; j < G; ++j)
        for (int i = 0; i < KB; ++i) acc[j][i] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
      if constexpr (DP) {
        const uint16_t* qbg = qb + g * G * head_dim;
        for (int64_t d = 0; d < head_dim; d += 32) {
          __m512bh kv[KB];
          for (int i = 0; i < KB; ++i) kv[i] = (__m512bh)_mm512_loadu_si512(kp[i] + d);
          for (int j = 0; j < G; ++j) {
            const __m512bh qd = (__m512bh)_mm512_loadu_si512(qbg + j * head_dim + d);
            for (int i = 0; i < KB; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], qd, kv[i]);
          }
        }
      } else
#endif
      for (int64_t d = 0; d < head_dim; d += 16) {
        __m512 kv[KB];
        for (int i = 0; i < KB; ++i) kv[i] = load16(kp[i] + d);
        for (int j = 0; j < G; ++j) {
          const __m512 qd = _mm512_loadu_ps(qg + j * head_dim + d);
          for (int i = 0; i < KB; ++i) acc[j][i] = _mm512_fmadd_ps(qd, kv[i], acc[j][i]);
        }
      }
      // The round's `valid` scores a head, tot * scale + brow fused, in one masked vector op
      // and store (was a scalar store a score: 32 rows x 100-600 keys, 30 layers' pools, 2
      // threads, 14.3-14.7 -> 13.3-13.7 ms over a Zen 4 VM's DRAM, the same bits).
      const __mmask16 lanes = (__mmask16)((1u << valid) - 1);
      const __m512 vscale = _mm512_set1_ps(scale);
      const __m512 bias = _mm512_maskz_loadu_ps(lanes, brow + t0);
      for (int j = 0; j < G; ++j) {
        const __m512 tot = _mm512_castps128_ps512(reduce4(acc[j]));
        _mm512_mask_storeu_ps(s + (g * G + j) * ctx + t0, lanes,
                              _mm512_fmadd_ps(tot, vscale, bias));
      }
    }
  }
  // Likewise the first values, asked for while the softmax runs.
  prefetch_rows(v_cache, off, 0, v_ahead, n, row_bytes);
  float inv[kMaxRowHeads];
  for (int64_t j = 0; j < groups * G; ++j) {
    float* sj = s + j * ctx;
    float mx = -INFINITY;
    int64_t t = 0;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= n; t += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(sj + t));
    mx = _mm512_reduce_max_ps(vmx);
    for (; t < n; ++t) mx = sj[t] > mx ? sj[t] : mx;
    const float sum = exp_and_sum(sj, n, mx);
    inv[j] = sum > 0.0f ? 1.0f / sum : 0.0f;
    if (stats != nullptr) stats[2 * j] = mx, stats[2 * j + 1] = sum;
  }
  weighted_values512<G>(v_cache, off, n, groups, head_dim, s, ctx, 1, inv, v_ahead, row_bytes, o);
}

#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define RS_DECODE_AMX 1
// A row's scores over a bf16 pool on AMX tiles, where the CPU has them: a tile of 16 keys
// (A: 16 token rows of the task's KV heads, 32 dims a tile, straight from the pool where the
// 16 rows are one block's) times the row's query heads (B: [dim pair][head], head h zero
// outside its KV head's dims, so one C tile sums each head's own dims): C [16 keys][16
// heads], the heads in a vector's lanes. Up to 16 query heads over whole 32-dim chunks, at
// most 6 of them (the B tiles stay in registers beside one A and one C). The queries are
// rounded to bf16 (as the prefill's tiles and vLLM-CPU round them); the softmax and the
// values pass stay fp32, as in attend_heads512. Scores cost a tile op per 32 dims of 16 keys
// where the vector kernel widens each key and runs an FMA per query head. 32 rows of 133-400
// keys, 9 heads over 3, 2 threads, one process switching the tiles off and on (an Emerald
// Rapids VM): one layer's pools, cache-resident, 13.1 -> 10.6 ms for 30 calls; 30 layers'
// own pools 20.0 -> 18.6 and 29.2 -> 26.9 ms over blocks in order, 20.5 -> 19.5 shuffled
// (there the reads from DRAM bound it).
constexpr int kAmxHeads = 16;  // query heads a task on tiles: the C tile's columns
constexpr int kAmxKeys = 16;   // keys a tile: the A tile's rows

// Whether a shape's scores run on tiles: the whole row's query heads fit the C tile and its
// KV heads' dims the six B tiles, so every task of the shape (a whole row, a KV head, a
// range of a row's keys) takes the tiles or none does, and the result does not depend on how
// threads split the rows.
inline bool decode_amx_fits(int64_t heads, int64_t kv_heads, int64_t head_dim) {
  return kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= 6 &&
         heads <= kAmxHeads && head_dim % 32 == 0 && kv_heads * head_dim <= 6 * 32 &&
         rs::amx_usable();
}

// The task's query heads as B tiles qt [chunk][16 dim pairs][16 heads] (bf16 pairs).
inline void pack_queries(const float* qh, int64_t groups, int64_t G, int64_t head_dim,
                         uint32_t* qt) {
  const int64_t chunks = groups * head_dim / 32;
  std::memset(qt, 0, chunks * 256 * sizeof(uint32_t));
  alignas(64) uint16_t qb[512];
  for (int64_t h = 0; h < groups * G; ++h) {
    const float* qrow = qh + h * head_dim;
    const int64_t g = h / G;
    for (int64_t d0 = 0; d0 < head_dim; d0 += 32) {
      rs::fp32_to_bf16(qrow + d0, 32, qb);
      const uint32_t* pairs = (const uint32_t*)qb;
      uint32_t* dst = qt + (g * head_dim + d0) / 32 * 256 + h;
      for (int p = 0; p < 16; ++p) dst[p * 16] = pairs[p];
    }
  }
}

// Chunk c's B tile is tile register t (the tile intrinsics take the register as a literal).
#define RS_B_TILES(X) X(0, 2) X(1, 3) X(2, 4) X(3, 5) X(4, 6) X(5, 7)

template <int G>
void attend_heads_amx(const float* qh, const uint16_t* k_cache, const uint16_t* v_cache,
                      const int64_t* off, int64_t slot_stride, int64_t groups,
                      const float* brow, int64_t n, int64_t head_dim, float scale, float* o,
                      float* stats) {
  const int64_t width = groups * head_dim, chunks = width / 32, heads = groups * G;
  const int64_t row_bytes = width * 2;
  static thread_local AlignedVector<uint32_t> qt_buf(6 * 256);
  static thread_local AlignedVector<uint16_t> kbuf(kAmxKeys * 6 * 32);
  static thread_local AlignedVector<float> sc;  // scores, then probabilities: [key][16 heads]
  const int64_t padded = (n + kAmxKeys - 1) / kAmxKeys * kAmxKeys;
  if ((int64_t)sc.size() < padded * kAmxHeads) sc.resize(padded * kAmxHeads);
  uint32_t* qt = qt_buf.data();
  float* s = sc.data();
  pack_queries(qh, groups, G, head_dim, qt);
  const int64_t k_ahead = std::max<int64_t>(kAmxKeys, kKeysAheadBytes / row_bytes);
  prefetch_rows(k_cache, off, 0, k_ahead, n, row_bytes);
  rs::load_tile_config();
#define RS_LOAD_B(c, t) \
  if (c < chunks) _tile_loadd(t, qt + c * 256, 64);
  RS_B_TILES(RS_LOAD_B)
#undef RS_LOAD_B
  for (int64_t t0 = 0; t0 < n; t0 += kAmxKeys) {
    const int64_t nv = std::min<int64_t>(kAmxKeys, n - t0);
    prefetch_rows(k_cache, off, t0 + k_ahead, t0 + k_ahead + kAmxKeys, n, row_bytes);
    // 16 keys of one block are evenly spaced rows of the pool: the A tiles read them there.
    // Others (a short last tile, a tile across blocks) are copied together first.
    const uint16_t* a = k_cache + off[t0];
    int64_t stride = slot_stride * 2;
    bool spaced = nv == kAmxKeys;
    for (int64_t i = 1; spaced && i < kAmxKeys; ++i) spaced = off[t0 + i] - off[t0 + i - 1] == slot_stride;
    if (!spaced) {
      for (int64_t i = 0; i < kAmxKeys; ++i) {
        uint16_t* dst = kbuf.data() + i * width;
        if (i < nv) {
          std::memcpy(dst, k_cache + off[t0 + i], row_bytes);
        } else {
          std::memset(dst, 0, row_bytes);
        }
      }
      a = kbuf.data();
      stride = row_bytes;
    }
    _tile_zero(0);
#define RS_SCORES(c, t)                \
  if (c < chunks) {                    \
    _tile_loadd(1, a + c * 32, stride); \
    _tile_dpbf16ps(0, 1, t);           \
  }
    RS_B_TILES(RS_SCORES)
#undef RS_SCORES
    _tile_stored(0, s + t0 * kAmxHeads, kAmxHeads * 4);
  }
  _tile_release();
#undef RS_B_TILES
  // The values' first rows asked for while the softmax runs.
  const int64_t v_ahead = std::max<int64_t>(1, kValuesAheadBytes / row_bytes);
  prefetch_rows(v_cache, off, 0, v_ahead, n, row_bytes);
  // Softmax down the keys, a query head a lane; masked keys (bias -inf) weigh 0.
  const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  __m512 mx = ninf;
  for (int64_t t = 0; t < n; ++t) {
    const __m512 v = _mm512_fmadd_ps(_mm512_load_ps(s + t * kAmxHeads), vscale,
                                     _mm512_set1_ps(brow[t]));
    _mm512_store_ps(s + t * kAmxHeads, v);
    mx = _mm512_max_ps(mx, v);
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m512 v = _mm512_load_ps(s + t * kAmxHeads);
    const __mmask16 live = _mm512_cmp_ps_mask(v, ninf, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, rs::exp16(_mm512_sub_ps(v, mx)));
    _mm512_store_ps(s + t * kAmxHeads, e);
    sum = _mm512_add_ps(sum, e);
  }
  alignas(64) float inv[kAmxHeads], mxs[kAmxHeads], sums[kAmxHeads];
  _mm512_store_ps(mxs, mx);
  _mm512_store_ps(sums, sum);
  for (int64_t j = 0; j < heads; ++j) {
    inv[j] = sums[j] > 0.0f ? 1.0f / sums[j] : 0.0f;
    if (stats != nullptr) stats[2 * j] = mxs[j], stats[2 * j + 1] = sums[j];
  }
  weighted_values512<G>(v_cache, off, n, groups, head_dim, s, 1, kAmxHeads, inv, v_ahead, row_bytes, o);
}

using AmxFn = void (*)(const float*, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                       int64_t, const float*, int64_t, int64_t, float, float*, float*);

// The tile kernel for a shape's tasks (any number of its KV heads), or null where the shape
// does not fit it or the tiles are off.
inline AmxFn decode_amx_fn(int64_t heads, int64_t kv_heads, int64_t head_dim) {
  if (!decode_amx_fits(heads, kv_heads, head_dim)) return nullptr;
  const int64_t group = heads / kv_heads;
  switch (group) {
    case 1: return attend_heads_amx<1>;
    case 2: return attend_heads_amx<2>;
    case 3: return attend_heads_amx<3>;
    case 4: return attend_heads_amx<4>;
    case 5: return attend_heads_amx<5>;
    case 6: return attend_heads_amx<6>;
    default: return nullptr;
  }
}
#endif

template <class T>
using GroupFn = void (*)(const float*, const T*, const T*, const int64_t*, const float*, int64_t,
                         int64_t, float, float*, int64_t, float*);

template <class T>
GroupFn<T> group_fn(int64_t group, int64_t head_dim) {
  if (head_dim % 8 != 0) return nullptr;
  switch (group) {
    case 1: return attend_group<1, T>;
    case 2: return attend_group<2, T>;
    case 3: return attend_group<3, T>;
    case 4: return attend_group<4, T>;
    case 5: return attend_group<5, T>;
    case 6: return attend_group<6, T>;
    case 7: return attend_group<7, T>;
    case 8: return attend_group<8, T>;
    default: return nullptr;
  }
}
#endif

// Whether a bf16 pool's shape has the vector path (the only one that reads bf16).
inline bool bf16_supported(int64_t heads, int64_t kv_heads, int64_t head_dim) {
#if defined(__AVX2__)
  return kv_heads > 0 && heads % kv_heads == 0 && head_dim % 8 == 0 && heads / kv_heads <= 8;
#else
  (void)heads, (void)kv_heads, (void)head_dim;
  return false;
#endif
}

template <class T>
struct AttnArgs {
  const float* q;
  const T *k_cache, *v_cache;
  const int64_t* block_ids;
  const float* bias;
  int64_t rows, width, heads, kv_heads, head_dim, block_size;
  float scale;
  float* out;
};

void generic_task(const AttnArgs<float>& a, int64_t r, int64_t g, float* s);

// A row's keys up to its last unmasked one (brow: its bias, ctx long): how many.
inline int64_t row_keys(const float* brow, int64_t ctx) {
  int64_t n = ctx;
  while (n > 0 && std::isinf(brow[n - 1]) && brow[n - 1] < 0) --n;
  return n;
}

// Row r's keys up to its last unmasked one: how many (n), and where each key's row of KV
// head g starts in either pool (elements), worked out once a task rather than by a division
// by block_size at every key.
template <class T>
const int64_t* key_offsets(const AttnArgs<T>& a, int64_t r, int64_t g, int64_t& n) {
  const int64_t block_size = a.block_size, ctx = a.width * block_size;
  const int64_t slot_stride = a.kv_heads * a.head_dim;  // from one token's K row to the next
  const int64_t* bt = a.block_ids + r * a.width;
  n = row_keys(a.bias + r * ctx, ctx);
  static thread_local std::vector<int64_t> offsets;
  if ((int64_t)offsets.size() < n) offsets.resize(n);
  int64_t* off = offsets.data();
  for (int64_t b = 0, t = 0; t < n; ++b) {
    const int64_t base = bt[b] * block_size * slot_stride + g * a.head_dim;
    for (int64_t i = 0; i < block_size && t < n; ++i, ++t) off[t] = base + i * slot_stride;
  }
  return off;
}

#if defined(__AVX512BF16__)
// Whether a bf16 pool's decode scores run on vdpbf16ps (attend_heads512's DP) for head_dim:
// on a CPU with AVX512-BF16 and no AMX tiles (those take attend_heads_amx, or, for shapes
// that do not fit the tiles, the fp32 path: Intel's cores run vdpbf16ps on one port). 32
// rows of 100-600 keys, 9 heads over 3, 30 layers' pools, 2 threads (an AMD Zen 4 VM):
// one layer's pools, cache-resident, 8.7 -> 7.4 ms for 30 calls; 30 layers' own pools
// 13.3-14.4 -> 12.8-13.1 ms over blocks in order, 15.1-15.4 -> 14.6-14.8 shuffled (there the
// reads from DRAM bound it). rs_bf16_dot_scores switches it off and on (tests compare the two).
int g_dp_scores_enabled = 1;
inline bool dp_scores(int64_t head_dim) {
  return g_dp_scores_enabled && head_dim % 32 == 0 && !rs::amx_usable();
}
#endif

#if defined(__AVX512F__)
template <class T>
using HeadsFn = void (*)(const float*, const T*, const T*, const int64_t*, int64_t, const float*,
                         int64_t, int64_t, float, float*, int64_t, float*, float*);

// The AVX-512 kernel for `group` query heads a KV head, or null where there is none.
template <class T>
HeadsFn<T> heads512_fn(int64_t group, int64_t head_dim) {
  if (head_dim % 16 != 0) return nullptr;
  auto by_group = [group](auto dp) -> HeadsFn<T> {
    constexpr bool DP = decltype(dp)::value;
    switch (group) {
      case 1: return attend_heads512<1, T, DP>;
      case 2: return attend_heads512<2, T, DP>;
      case 3: return attend_heads512<3, T, DP>;
      case 4: return attend_heads512<4, T, DP>;
      case 5: return attend_heads512<5, T, DP>;
      case 6: return attend_heads512<6, T, DP>;
      default: return nullptr;  // 7, 8: the 8-lane kernel's register budget
    }
  };
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (dp_scores(head_dim)) return by_group(std::true_type{});
  }
#endif
  return by_group(std::false_type{});
}

// Row r's KV heads [g0, g0 + groups) in one task with the AVX-512 kernel; false where the
// shape has none. All of a row's KV heads at once (groups = kv_heads): a token's rows of every
// KV head are contiguous in the pools, so the row's keys and values stream through in order,
// where a task a KV head reads a third of each token's stretch (with 3 KV heads) and leaves
// the rest to the next task.
template <class T>
bool attend_heads(const AttnArgs<T>& a, int64_t r, int64_t g0, int64_t groups, float* s) {
  const int64_t heads = a.heads, head_dim = a.head_dim, group = heads / a.kv_heads;
  const HeadsFn<T> fn = heads512_fn<T>(group, head_dim);
  if (fn == nullptr || groups * group > kMaxRowHeads) return false;
  const int64_t ctx = a.width * a.block_size, first = (r * heads + g0 * group) * head_dim;
  int64_t n;
  const int64_t* off = key_offsets(a, r, g0, n);
#if defined(RS_DECODE_AMX)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (const AmxFn amx = decode_amx_fn(heads, a.kv_heads, head_dim)) {
      amx(a.q + first, a.k_cache, a.v_cache, off, a.kv_heads * head_dim, groups,
          a.bias + r * ctx, n, head_dim, a.scale, a.out + first, nullptr);
      return true;
    }
  }
#endif
  fn(a.q + first, a.k_cache, a.v_cache, off, groups, a.bias + r * ctx, n, head_dim, a.scale, s,
     ctx, a.out + first, nullptr);
  return true;
}

// A single row's keys in kRowParts ranges, merged: a one-row step (a single stream's decode)
// has only its KV heads to split between threads otherwise, 3 over 2 threads with this model
// (one thread reading twice the other's keys; 0.95 against 1.45 ms a step over 384 keys).
// Every one-row attention of kRowSplitKeys keys or more takes this way, however many threads
// run it (the parts are fixed, not one a thread), so its result does not depend on the thread
// count, and the one-call step (model_step.cpp) and the op-by-op path agree bit for bit.
constexpr int kRowParts = 2;
constexpr int64_t kRowSplitKeys = 64;

// Whether a one-row attention of n keys over this shape (heads a multiple of kv_heads) is
// split into parts.
template <class T>
bool row_split(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t n) {
  return n >= kRowSplitKeys && heads <= kMaxRowHeads &&
         heads512_fn<T>(heads / kv_heads, head_dim) != nullptr;
}

// Part p of row 0's keys (the keys [n p / parts, n (p + 1) / parts), whole rounds of 4):
// every query head's output over them into o [heads, head_dim], normalized by the part's own
// sum, and the part's max and sum into stats [heads][2].
template <class T>
void attend_row_part(const AttnArgs<T>& a, int p, float* s, float* o, float* stats) {
  const int64_t ctx = a.width * a.block_size;
  int64_t n;
  const int64_t* off = key_offsets(a, 0, 0, n);
  const int64_t k0 = n * p / kRowParts / 4 * 4;
  const int64_t k1 = p + 1 == kRowParts ? n : n * (p + 1) / kRowParts / 4 * 4;
#if defined(RS_DECODE_AMX)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (const AmxFn amx = decode_amx_fn(a.heads, a.kv_heads, a.head_dim)) {
      amx(a.q, a.k_cache, a.v_cache, off + k0, a.kv_heads * a.head_dim, a.kv_heads, a.bias + k0,
          k1 - k0, a.head_dim, a.scale, o, stats);
      return;
    }
  }
#endif
  const HeadsFn<T> fn = heads512_fn<T>(a.heads / a.kv_heads, a.head_dim);
  fn(a.q, a.k_cache, a.v_cache, off + k0, a.kv_heads, a.bias + k0, k1 - k0, a.head_dim, a.scale,
     s, ctx, o, stats);
}

// Query heads [h0, h1) of the parts merged into out: each part's output weighted by its sum
// at the overall max (a part that saw only masked keys has sum 0 and weighs nothing).
inline void merge_row_parts(const float* o, const float* stats, int64_t heads, int64_t head_dim,
                            int64_t h0, int64_t h1, float* out) {
  for (int64_t h = h0; h < h1; ++h) {
    float mx = -INFINITY;
    for (int p = 0; p < kRowParts; ++p) mx = std::max(mx, stats[(p * heads + h) * 2]);
    float w[kRowParts], total = 0.0f;
    for (int p = 0; p < kRowParts; ++p) {
      const float sum = stats[(p * heads + h) * 2 + 1];
      w[p] = sum > 0.0f ? sum * std::exp(stats[(p * heads + h) * 2] - mx) : 0.0f;
      total += w[p];
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    float* dst = out + h * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      float acc = 0.0f;
      for (int p = 0; p < kRowParts; ++p) acc += w[p] * o[(p * heads + h) * head_dim + d];
      dst[d] = acc * inv;
    }
  }
}
#endif

// Task r * kv_heads + g: row r's query heads of KV head g. s: heads * width * block_size floats.
template <class T>
void attend_task(const AttnArgs<T>& a, int64_t task, float* s) {
  const int64_t kv_heads = a.kv_heads;
  const int64_t r = task / kv_heads, g = task % kv_heads;
#if defined(__AVX512F__)
  if (attend_heads(a, r, g, 1, s)) return;
#endif
#if defined(__AVX2__)
  const int64_t heads = a.heads, head_dim = a.head_dim;
  const int64_t group = heads / kv_heads, ctx = a.width * a.block_size;
  if (const GroupFn<T> fast = group_fn<T>(group, head_dim)) {
    int64_t n;
    const int64_t* off = key_offsets(a, r, g, n);
    fast(a.q + (r * heads + g * group) * head_dim, a.k_cache, a.v_cache, off, a.bias + r * ctx,
         n, head_dim, a.scale, s, ctx, a.out + (r * heads + g * group) * head_dim);
    return;
  }
#endif
  if constexpr (std::is_same_v<T, float>) generic_task(a, r, g, s);
}

// Tasks [begin, end): whole rows in one task each where the kernel has it (attend_heads).
template <class T>
void run_tasks(const AttnArgs<T>& a, int64_t begin, int64_t end, float* s) {
  for (int64_t task = begin; task < end;) {
#if defined(__AVX512F__)
    if (task % a.kv_heads == 0 && task + a.kv_heads <= end &&
        attend_heads(a, task / a.kv_heads, 0, a.kv_heads, s)) {
      task += a.kv_heads;
      continue;
    }
#endif
    attend_task(a, task, s);
    ++task;
  }
}

// The plain loops of a fp32 pool's task (a shape or build without the vector path).
void generic_task(const AttnArgs<float>& a, int64_t r, int64_t g, float* s) {
  const int64_t heads = a.heads, kv_heads = a.kv_heads, head_dim = a.head_dim;
  const int64_t width = a.width, block_size = a.block_size;
  const int64_t group = heads / kv_heads, ctx = width * block_size;
  const int64_t slot_stride = kv_heads * head_dim;
  const float *k_cache = a.k_cache, *v_cache = a.v_cache;
  const float scale = a.scale;
  const float* brow = a.bias + r * ctx;
  const int64_t* bt = a.block_ids + r * width;
  const float* qh = a.q + (r * heads + g * group) * head_dim;
  float* out = a.out;
  // Scores: each key once, for every query head of the group.
  for (int64_t b = 0; b < width; ++b) {
    const float* kb = k_cache + (bt[b] * block_size * kv_heads + g) * head_dim;
    for (int64_t i = 0; i < block_size; ++i) {
      const int64_t t = b * block_size + i;
      const bool masked = std::isinf(brow[t]) && brow[t] < 0;
      const float* kt = kb + i * slot_stride;
      for (int64_t j = 0; j < group; ++j) {
        s[j * ctx + t] = masked ? -INFINITY : dot(qh + j * head_dim, kt, head_dim) * scale + brow[t];
      }
    }
  }
  for (int64_t j = 0; j < group; ++j) {
    float* sj = s + j * ctx;
    float mx = -INFINITY;
    for (int64_t t = 0; t < ctx; ++t) mx = sj[t] > mx ? sj[t] : mx;
    const float sum = mx == -INFINITY ? 0.0f : exp_and_sum(sj, ctx, mx);
    if (mx == -INFINITY) {
      for (int64_t t = 0; t < ctx; ++t) sj[t] = 0.0f;
    }
    weighted_values(sj, v_cache, bt, width, block_size, slot_stride, g * head_dim, head_dim,
                    sum > 0.0f ? 1.0f / sum : 0.0f, out + (r * heads + g * group + j) * head_dim);
  }
}

template <class T>
int paged_decode_attention(const float* q, const T* k_cache, const T* v_cache,
                           const int64_t* block_ids, const float* bias, int64_t rows,
                           int64_t width, int64_t heads, int64_t kv_heads, int64_t head_dim,
                           int64_t block_size, float scale, float* out, int nthreads) {
  if (kv_heads < 1 || heads % kv_heads != 0 || nthreads < 1) return 1;
  if (!std::is_same_v<T, float> && !bf16_supported(heads, kv_heads, head_dim)) return 2;
  const AttnArgs<T> a{q,    k_cache,  v_cache,  block_ids,  bias,  rows, width,
                      heads, kv_heads, head_dim, block_size, scale, out};
  const int64_t ctx = width * block_size;
#if defined(__AVX512F__)
  // One row of enough keys: its keys in parts, merged (attend_row_part).
  if (rows == 1 && row_split<T>(heads, kv_heads, head_dim, row_keys(bias, ctx))) {
    AlignedVector<float> parts(kRowParts * heads * (head_dim + 2));
    float* stats = parts.data() + kRowParts * heads * head_dim;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (ctx >= 512)
    for (int p = 0; p < kRowParts; ++p) {
      static thread_local AlignedVector<float> scores;
      if ((int64_t)scores.size() < heads * ctx) scores.resize(heads * ctx);
      attend_row_part(a, p, scores.data(), parts.data() + p * heads * head_dim,
                      stats + p * heads * 2);
    }
    merge_row_parts(parts.data(), stats, heads, head_dim, 0, heads, out);
    return 0;
  }
#endif
#pragma omp parallel num_threads(nthreads) if (rows * kv_heads > 1 && rows * ctx >= 512)
  {
    AlignedVector<float> scores(heads * ctx);
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t tasks = rows * kv_heads;
    // Contiguous shares, split between rows where they can be (attend_heads' whole rows).
    const int64_t b = rows >= nth ? rows * t / nth * kv_heads : tasks * t / nth;
    const int64_t e = rows >= nth ? rows * (t + 1) / nth * kv_heads : tasks * (t + 1) / nth;
    run_tasks(a, b, e, scores.data());
  }
  return 0;
}

template <class T>
int paged_decode_attention_tasks(const float* q, const T* k_cache, const T* v_cache,
                                 const int64_t* block_ids, const float* bias, int64_t rows,
                                 int64_t width, int64_t heads, int64_t kv_heads,
                                 int64_t head_dim, int64_t block_size, float scale, float* out,
                                 int64_t task_begin, int64_t task_end) {
  if (kv_heads < 1 || heads % kv_heads != 0) return 1;
  if (!std::is_same_v<T, float> && !bf16_supported(heads, kv_heads, head_dim)) return 2;
  const AttnArgs<T> a{q,    k_cache,  v_cache,  block_ids,  bias,  rows, width,
                      heads, kv_heads, head_dim, block_size, scale, out};
  static thread_local AlignedVector<float> scores;
  const int64_t need = heads * width * block_size;
  if ((int64_t)scores.size() < need) scores.resize(need);
  run_tasks(a, task_begin, task_end, scores.data());
  return 0;
}

// Part `part` of a one-row attention split into kRowParts (see attend_row_part); 2 where
// the row is not split (row_split), and nothing is written.
template <class T>
int decode_row_part(const float* q, const T* k_cache, const T* v_cache, const int64_t* block_ids,
                    const float* bias, int64_t width, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, int64_t block_size, float scale, int part, float* parts) {
#if defined(__AVX512F__)
  if (kv_heads < 1 || heads % kv_heads != 0 || part < 0 || part >= kRowParts) return 1;
  if (!std::is_same_v<T, float> && !bf16_supported(heads, kv_heads, head_dim)) return 2;
  const int64_t ctx = width * block_size;
  if (!row_split<T>(heads, kv_heads, head_dim, row_keys(bias, ctx))) return 2;
  const AttnArgs<T> a{q,    k_cache,  v_cache,  block_ids,  bias,  1, width,
                      heads, kv_heads, head_dim, block_size, scale, nullptr};
  static thread_local AlignedVector<float> scores;
  if ((int64_t)scores.size() < heads * ctx) scores.resize(heads * ctx);
  attend_row_part(a, part, scores.data(), parts + part * heads * head_dim,
                  parts + kRowParts * heads * head_dim + part * heads * 2);
  return 0;
#else
  (void)q, (void)k_cache, (void)v_cache, (void)block_ids, (void)bias, (void)width, (void)heads,
      (void)kv_heads, (void)head_dim, (void)block_size, (void)scale, (void)part, (void)parts;
  return 2;
#endif
}

}  // namespace

extern "C" {

// 0 on success; 1: heads not a multiple of kv_heads; 2: a bf16 pool of a shape only the
// fp32 loops take (head_dim % 8, more than 8 query heads a KV head, or no AVX2).
int rs_paged_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                              const int64_t* block_ids, const float* bias, int64_t rows,
                              int64_t width, int64_t heads, int64_t kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, float* out, int nthreads) {
  return paged_decode_attention(q, k_cache, v_cache, block_ids, bias, rows, width, heads,
                                kv_heads, head_dim, block_size, scale, out, nthreads);
}

// The same over bf16 pools (uint16 bits): keys and values widened to fp32 as they are read.
int rs_paged_decode_attention_bf16(const float* q, const uint16_t* k_cache,
                                   const uint16_t* v_cache, const int64_t* block_ids,
                                   const float* bias, int64_t rows, int64_t width, int64_t heads,
                                   int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                   float scale, float* out, int nthreads) {
  return paged_decode_attention(q, k_cache, v_cache, block_ids, bias, rows, width, heads,
                                kv_heads, head_dim, block_size, scale, out, nthreads);
}

// Tasks [task_begin, task_end) of the same attention (task r * kv_heads + g: row r's query
// heads of KV head g) on the calling thread, for a caller that splits the tasks over the
// threads of its own parallel region (model_step.cpp).
int rs_paged_decode_attention_tasks(const float* q, const float* k_cache, const float* v_cache,
                                    const int64_t* block_ids, const float* bias, int64_t rows,
                                    int64_t width, int64_t heads, int64_t kv_heads,
                                    int64_t head_dim, int64_t block_size, float scale, float* out,
                                    int64_t task_begin, int64_t task_end) {
  return paged_decode_attention_tasks(q, k_cache, v_cache, block_ids, bias, rows, width, heads,
                                      kv_heads, head_dim, block_size, scale, out, task_begin,
                                      task_end);
}

int rs_paged_decode_attention_tasks_bf16(const float* q, const uint16_t* k_cache,
                                         const uint16_t* v_cache, const int64_t* block_ids,
                                         const float* bias, int64_t rows, int64_t width,
                                         int64_t heads, int64_t kv_heads, int64_t head_dim,
                                         int64_t block_size, float scale, float* out,
                                         int64_t task_begin, int64_t task_end) {
  return paged_decode_attention_tasks(q, k_cache, v_cache, block_ids, bias, rows, width, heads,
                                      kv_heads, head_dim, block_size, scale, out, task_begin,
                                      task_end);
}

// Whether a bf16 pool's decode scores run on AMX tiles for this shape here (the queries
// rounded to bf16; see attend_heads_amx), rather than in fp32 over the widened keys.
int rs_decode_attention_bf16_products(int64_t heads, int64_t kv_heads, int64_t head_dim) {
#if defined(RS_DECODE_AMX)
  if (decode_amx_fits(heads, kv_heads, head_dim)) return 1;
#endif
#if defined(__AVX512BF16__)
  if (kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= 6 && dp_scores(head_dim)) {
    return 1;
  }
#endif
  (void)heads, (void)kv_heads, (void)head_dim;
  return 0;
}

// Whether a bf16 pool's decode scores run on vdpbf16ps where AMX tiles do not take them (a
// CPU with AVX512-BF16 and no AMX); enable 0 or 1 switches that off or back on, -1 leaves it.
int rs_bf16_dot_scores(int enable) {
#if defined(__AVX512BF16__)
  if (enable >= 0) g_dp_scores_enabled = enable;
  return g_dp_scores_enabled && !rs::amx_usable() ? 1 : 0;
#else
  (void)enable;
  return 0;
#endif
}

// A one-row attention as model_step.cpp's threads split it: part `part` (0 .. parts - 1, from
// rs_decode_row_parts) into `parts` ([parts][heads][head_dim] outputs, then [parts][heads][2]
// max and sum); 2 where this row is not split (run its tasks instead). Then
// rs_decode_row_merge for query heads [h0, h1) into out [heads, head_dim]. The same parts and
// merge as rs_paged_decode_attention's for one row: the same result bit for bit.
int rs_decode_row_parts() {
#if defined(__AVX512F__)
  return kRowParts;
#else
  return 0;
#endif
}

// Keys of a row with this mask row (bias [ctx]) up to its last unmasked one: the count the
// kernels attend over (model_step.cpp weighs its rows by it).
int64_t rs_decode_row_keys(const float* bias, int64_t ctx) { return row_keys(bias, ctx); }

// Whether a one-row attention with this mask row (bias [width * block_size]) and shape is
// split into parts (bf16: over a bf16 pool).
int rs_decode_row_split(const float* bias, int64_t width, int64_t block_size, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, int bf16) {
#if defined(__AVX512F__)
  if (kv_heads < 1 || heads % kv_heads != 0) return 0;
  const int64_t n = row_keys(bias, width * block_size);
  if (bf16) {
    return bf16_supported(heads, kv_heads, head_dim) &&
           row_split<uint16_t>(heads, kv_heads, head_dim, n);
  }
  return row_split<float>(heads, kv_heads, head_dim, n) ? 1 : 0;
#else
  (void)bias, (void)width, (void)block_size, (void)heads, (void)kv_heads, (void)head_dim,
      (void)bf16;
  return 0;
#endif
}

int rs_decode_row_part(const float* q, const float* k_cache, const float* v_cache,
                       const int64_t* block_ids, const float* bias, int64_t width, int64_t heads,
                       int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
                       int part, float* parts) {
  return decode_row_part(q, k_cache, v_cache, block_ids, bias, width, heads, kv_heads, head_dim,
                         block_size, scale, part, parts);
}

int rs_decode_row_part_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                            const int64_t* block_ids, const float* bias, int64_t width,
                            int64_t heads, int64_t kv_heads, int64_t head_dim,
                            int64_t block_size, float scale, int part, float* parts) {
  return decode_row_part(q, k_cache, v_cache, block_ids, bias, width, heads, kv_heads, head_dim,
                         block_size, scale, part, parts);
}

void rs_decode_row_merge(const float* parts, int64_t heads, int64_t head_dim, int64_t h0,
                         int64_t h1, float* out) {
#if defined(__AVX512F__)
  merge_row_parts(parts, parts + kRowParts * heads * head_dim, heads, head_dim, h0, h1, out);
#else
  (void)parts, (void)heads, (void)head_dim, (void)h0, (void)h1, (void)out;
#endif
}

}  // extern "C"
