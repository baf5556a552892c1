// Causal prefill attention over the paged KV cache, read in place: a flash-attention kernel.
//
// One row (a sequence's chunk of query_len queries after num_computed cached tokens, its own
// keys and values already written to the cache): query i, at position num_computed + i,
// attends to the row's keys 0 .. num_computed + i. K/V pools as the decode kernel's
// ([num_blocks, block_size, kv_heads, head_dim], fp32 or bf16 widened as read).
//
// Work: a task is a block of kQB queries of one KV head: its kQB x G query heads (G per KV
// head) as the rows of a small GEMM. Keys go 32 at a time: the block's keys gathered from the
// pool and transposed into a [head_dim][32] tile, scores by outer products (up to 12 rows x
// 32 keys a pass, 24 accumulators: the quantized GEMM's panel kernel), the causal mask on the
// diagonal tiles, an online softmax per row (running max and sum, Milakov and Gimelshein
// 2018; FlashAttention's schedule), and P @ V into fp32 accumulators kept per task. torch's
// CPU flash attention (SDPA) runs these shapes at ~70-100 GF/s here; this one reads the
// cache where it is (no gather of the cached prefix) and runs its scores at the GEMM's rate.
// AVX-512 builds, head_dim % 16 == 0 and at most 8 query heads a KV head; otherwise the
// entry points return 2 and the caller keeps torch's SDPA. A bf16 pool on an AVX512-BF16
// build with head_dim 32, 64, 96 or 128 takes prefill_task_bf16: both products in bf16
// (vdpbf16ps), as the bf16 GEMMs beside it (2 threads, one row's causal attention over 30
// layers, 9 heads over 3: 512 tokens 69-71 -> 50-51 ms, 1024 tokens 261-266 -> 176-207 ms),
// except on a build for a CPU with AMX: there prefill_task_amx runs the products on tiles
// where the shape fits (below), and the other shapes take the fp32 task over the widened
// pool, since Intel's cores run vdpbf16ps on one port where they run FMAs on two (an Emerald
// Rapids VM, 2 threads, 30 layers, 8 rows of 256 tokens: 209 ms with vdpbf16ps, 148-184 in
// fp32, 90 on tiles; 4 rows of 512: 372-382, 260-304, 148).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "panel_kernels.h"
#include "quant_blocks.h"

namespace {

#if defined(__AVX512F__)
constexpr int kQB = 8;        // queries a task
constexpr int kKB = rs::kPanelWidth;  // keys a tile: the score kernel's panel
constexpr int kMaxG = 8;      // query heads a KV head
constexpr int kPassRows = 12;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

using rs::exp16;

// o[r][d0 .. d0 + 16 W) += sum_t p[r][t] v_t for NR rows from r0 and nk keys of the tile
// (value rows at vp[t]): NR x W accumulators in registers.
template <class T, int NR, int W>
void values_pass(const float* p, const T* const* vp, int nk, int64_t hd, int64_t d0, int r0,
                 float* o) {
  __m512 acc[NR][W];
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < W; ++c) acc[r][c] = _mm512_loadu_ps(o + (r0 + r) * hd + d0 + 16 * c);
  for (int t = 0; t < nk; ++t) {
    __m512 vv[W];
#pragma GCC unroll 4
    for (int c = 0; c < W; ++c) vv[c] = load16(vp[t] + d0 + 16 * c);
#pragma GCC unroll 6
    for (int r = 0; r < NR; ++r) {
      const __m512 pr = _mm512_set1_ps(p[(r0 + r) * kKB + t]);
#pragma GCC unroll 4
      for (int c = 0; c < W; ++c) acc[r][c] = _mm512_fmadd_ps(pr, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < W; ++c) _mm512_storeu_ps(o + (r0 + r) * hd + d0 + 16 * c, acc[r][c]);
}

template <class T, int W>
void values_rows(int rows, const float* p, const T* const* vp, int nk, int64_t hd, int64_t d0,
                 float* o) {
  constexpr int RB = 6;  // 6 x 4 accumulators + 4 value vectors + a broadcast
  int r0 = 0;
  for (; r0 + RB <= rows; r0 += RB) values_pass<T, RB, W>(p, vp, nk, hd, d0, r0, o);
  for (; r0 < rows; ++r0) values_pass<T, 1, W>(p, vp, nk, hd, d0, r0, o);
}

// o[r][0..hd) += sum_t p[r][t] v_t for `rows` rows, nk keys of the tile.
template <class T>
void accumulate_values(int rows, const float* p, const T* const* vp, int nk, int64_t hd,
                       float* o) {
  int64_t d0 = 0;
  for (; d0 + 64 <= hd; d0 += 64) values_rows<T, 4>(rows, p, vp, nk, hd, d0, o);
  for (; d0 < hd; d0 += 16) values_rows<T, 1>(rows, p, vp, nk, hd, d0, o);
}

template <class T>
struct Args {
  const float* q;  // [query_len, heads, hd], a token's heads ldq floats after the last's
  int64_t ldq;
  const T *k_cache, *v_cache;
  const int64_t* block_ids;
  int64_t num_computed, query_len, heads, kv_heads, hd, block_size;
  float scale;
  float* out;  // [query_len, heads, hd]
};

// Task: queries [q0, q0 + kQB) of KV head g; its helpers first.

// The keys t0 .. t0 + nk of a tile (padded to kKB with the last one): where each key's
// and value's part of KV head g starts in the pools.
template <class T>
void tile_rows(const Args<T>& a, int64_t g, int64_t t0, int nk, const T** kp, const T** vp) {
  const int64_t slot_stride = a.kv_heads * a.hd;
  // Block and slot of key t0, then stepped key by key: one division a tile, not two a key
  // (64-bit divisions by the runtime block size).
  int64_t b = t0 / a.block_size, slot = t0 - b * a.block_size;
  for (int i = 0; i < kKB; ++i) {
    if (i < nk && i > 0 && ++slot == a.block_size) slot = 0, ++b;
    const int64_t off = (a.block_ids[b] * a.block_size + slot) * slot_stride + g * a.hd;
    kp[i] = a.k_cache + off;
    vp[i] = a.v_cache + off;
  }
}

// One tile of one row (its dot products sr[0..32), its query at position pos): the causal
// mask, the scale and a step of the online softmax. Updates the running max m, rescales the
// output row o [hd] by the returned alpha (the caller rescales its running sum), and leaves
// the tile's probabilities, 0 for the keys the row does not see, in z0 and z1.
inline float online_softmax(float* sr, float scale, int64_t pos, int64_t t0, int nk, bool mask,
                            float& m, float* o, int64_t hd, __m512& z0, __m512& z1) {
  // Keys of the tile this row sees: none for a query before the tile (a diagonal tile).
  const int64_t seen = pos + 1 - t0;
  const int visible = (int)(seen < 0 ? 0 : seen < nk ? seen : nk);
  if (mask) {
    for (int i = visible; i < kKB; ++i) sr[i] = -INFINITY;
  }
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(sr), vs);
  const __m512 s1 = _mm512_mul_ps(_mm512_loadu_ps(sr + 16), vs);
  const float mx = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
  const float m_new = mx > m ? mx : m;
  const float alpha = std::exp(m - m_new);  // 0 on the first tile (m = -inf)
  const __m512 vm = _mm512_set1_ps(m_new);
  const __m512 p0 = exp16(_mm512_sub_ps(s0, vm)), p1 = exp16(_mm512_sub_ps(s1, vm));
  // Masked lanes: exp16 clamps -inf to exp(-87) ~ 1e-38, not 0: zero them.
  const __mmask16 k0 = rs::first_lanes(visible), k1 = rs::first_lanes(visible - 16);
  z0 = _mm512_maskz_mov_ps(k0, p0), z1 = _mm512_maskz_mov_ps(k1, p1);
  m = m_new;
  if (alpha != 1.0f) {
    const __m512 va = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < hd; d += 16)
      _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), va));
  }
  return alpha;
}

// out's rows of the task: o / l.
template <class T>
void store_rows(const Args<T>& a, int64_t q0, int64_t g, int rows, const float* o, const float* l) {
  const int64_t hd = a.hd, G = a.heads / a.kv_heads;
  for (int r = 0; r < rows; ++r) {
    float* dst = a.out + ((q0 + r / G) * a.heads + g * G + r % G) * hd;
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    for (int64_t d = 0; d < hd; d += 16)
      _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * hd + d), inv));
  }
}

template <class T>
void prefill_task(const Args<T>& a, int64_t q0, int64_t g) {
  const int64_t hd = a.hd, G = a.heads / a.kv_heads;
  const int nq = (int)(a.query_len - q0 < kQB ? a.query_len - q0 : kQB);
  const int rows = nq * (int)G;  // row r: query q0 + r / G, head g * G + r % G
  static thread_local rs::AlignedVector<float> buf;
  const int64_t need = rows * hd /*q*/ + hd * kKB /*kt*/ + rows * kKB /*s*/ + rows * hd /*o*/;
  if ((int64_t)buf.size() < need) buf.resize(need);
  float* q = buf.data();
  float* kt = q + rows * hd;
  float* s = kt + hd * kKB;
  float* o = s + rows * kKB;
  for (int r = 0; r < rows; ++r) {
    const float* src = a.q + (q0 + r / G) * a.ldq + (g * G + r % G) * hd;
    for (int64_t d = 0; d < hd; ++d) q[r * hd + d] = src[d];
    for (int64_t d = 0; d < hd; ++d) o[r * hd + d] = 0.0f;
  }
  float m[kQB * kMaxG], l[kQB * kMaxG];
  for (int r = 0; r < rows; ++r) m[r] = -INFINITY, l[r] = 0.0f;
  const int64_t first_pos = a.num_computed + q0, last_pos = first_pos + nq - 1;
  const T* kp[kKB];
  const T* vp[kKB];
  for (int64_t t0 = 0; t0 <= last_pos; t0 += kKB) {
    const int nk = (int)(last_pos + 1 - t0 < kKB ? last_pos + 1 - t0 : kKB);
    tile_rows(a, g, t0, nk, kp, vp);
    // The tile kt [hd][32]: 16 x 16 transposes of the keys' rows (widened to fp32).
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      for (int half = 0; half < 2; ++half) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(load16(kp[16 * half + i] + d0));
        rs::transpose16x16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kt + (d0 + i) * kKB + 16 * half, r[i]);
      }
    }
    rs::even_passes<kPassRows>(rows, [&](auto n, int64_t i) {
      rs::panel_f32<decltype(n)::value>(q + i * hd, hd, kt, hd, s + i * kKB, kKB, kKB);
    });
    // Causal mask (where some key is past some query's position, or the tile is short)
    // and the online softmax, row by row.
    const bool mask = t0 + kKB - 1 > first_pos || nk < kKB;
    for (int r = 0; r < rows; ++r) {
      float* sr = s + r * kKB;
      __m512 z0, z1;
      const float alpha = online_softmax(sr, a.scale, first_pos + r / G, t0, nk, mask, m[r], o + r * hd, hd, z0, z1);
      _mm512_storeu_ps(sr, z0);
      _mm512_storeu_ps(sr + 16, z1);
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(z0, z1));
    }
    accumulate_values(rows, s, vp, nk, hd, o);
  }
  store_rows(a, q0, g, rows, o, l);
}
#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
// Head dims prefill_task_bf16 takes.
inline bool bf16_task_fits(int64_t hd) { return hd % 32 == 0 && hd <= 128; }

// The task of a bf16 pool on a CPU with AVX512-BF16: the same tiles and online softmax, with
// both products in bf16 (vdpbf16ps, fp32 sums), as the bf16 GEMMs beside it compute: the
// queries rounded to bf16 for the scores, the probabilities rounded to bf16 for P @ V (the
// keys and values are bf16 already). Half the instructions of the fp32 task on each product
// and half the transposing: a tile of keys is transposed as pairs of dimensions (32-bit
// lanes of two bf16), and values go in as pairs of keys.

// o[r][0..64 W) += sum_t p[r][t] v_t for NR rows from r0: pp [rows][16] holds each row's
// probabilities as bf16 pairs of keys (2j, 2j + 1); vpair [16][W][16]: for key pair j, the
// pairs (v_2j[d], v_2j+1[d]) of 16 dimensions a vector.
template <int NR, int W>
void values_pass_bf16(const uint32_t* pp, const uint32_t* vpair, int npairs, int64_t hd, int r0,
                      float* o) {
  __m512 acc[NR][W];
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < W; ++c) acc[r][c] = _mm512_loadu_ps(o + (r0 + r) * hd + 16 * c);
  for (int j = 0; j < npairs; ++j) {
    __m512bh vv[W];
#pragma GCC unroll 4
    for (int c = 0; c < W; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vpair + (j * W + c) * 16);
#pragma GCC unroll 6
    for (int r = 0; r < NR; ++r) {
      const __m512bh pr = (__m512bh)_mm512_set1_epi32((int)pp[(r0 + r) * 16 + j]);
#pragma GCC unroll 4
      for (int c = 0; c < W; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pr, vv[c]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < W; ++c) _mm512_storeu_ps(o + (r0 + r) * hd + 16 * c, acc[r][c]);
}

template <int W>
void values_rows_bf16(int rows, const uint32_t* pp, const uint32_t* vpair, int npairs,
                      int64_t hd, float* o) {
  // RB x W accumulators + W value vectors + a broadcast within 32 registers.
  constexpr int RB = (32 - W - 1) / W < 12 ? (32 - W - 1) / W : 12;
  int r0 = 0;
  for (; r0 + RB <= rows; r0 += RB) values_pass_bf16<RB, W>(pp, vpair, npairs, hd, r0, o);
  for (; r0 < rows; ++r0) values_pass_bf16<1, W>(pp, vpair, npairs, hd, r0, o);
}

// Task: queries [q0, q0 + kQB) of KV head g, over a bf16 pool; head_dim % 32 == 0, at most
// 128 (the value pass holds a row's whole head_dim in registers).
void prefill_task_bf16(const Args<uint16_t>& a, int64_t q0, int64_t g) {
  const int64_t hd = a.hd, G = a.heads / a.kv_heads;
  const int64_t pairs = hd / 2, vecs = hd / 32;  // bf16 pairs and 32-bf16 vectors a row
  const int nq = (int)(a.query_len - q0 < kQB ? a.query_len - q0 : kQB);
  const int rows = nq * (int)G;  // row r: query q0 + r / G, head g * G + r % G
  static thread_local rs::AlignedVector<float> fbuf;
  static thread_local rs::AlignedVector<uint32_t> ubuf;
  const int64_t fneed = rows * kKB /*s*/ + rows * hd /*o*/;
  const int64_t uneed = rows * pairs /*q*/ + pairs * kKB /*ktp*/ + rows * 16 /*pp*/ +
                        (kKB / 2) * hd /*vpair*/;
  if ((int64_t)fbuf.size() < fneed) fbuf.resize(fneed);
  if ((int64_t)ubuf.size() < uneed) ubuf.resize(uneed);
  float* s = fbuf.data();
  float* o = s + rows * kKB;
  uint32_t* qp = ubuf.data();
  uint32_t* ktp = qp + rows * pairs;
  uint32_t* pp = ktp + pairs * kKB;
  uint32_t* vpair = pp + rows * 16;
  for (int r = 0; r < rows; ++r) {
    const float* src = a.q + (q0 + r / G) * a.ldq + (g * G + r % G) * hd;
    for (int64_t d = 0; d < hd; d += 32) {
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + d + 16), _mm512_loadu_ps(src + d));
      _mm512_storeu_si512(qp + r * pairs + d / 2, (__m512i)b);
    }
    for (int64_t d = 0; d < hd; ++d) o[r * hd + d] = 0.0f;
  }
  // vpermt2w indices interleaving two rows' 16-bit lanes: (a_i, b_i) for i in [0, 16) and
  // [16, 32).
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 16; ++i) {
    lo_idx[2 * i] = (uint16_t)i, lo_idx[2 * i + 1] = (uint16_t)(32 + i);
    hi_idx[2 * i] = (uint16_t)(16 + i), hi_idx[2 * i + 1] = (uint16_t)(48 + i);
  }
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  float m[kQB * kMaxG], l[kQB * kMaxG];
  for (int r = 0; r < rows; ++r) m[r] = -INFINITY, l[r] = 0.0f;
  const int64_t first_pos = a.num_computed + q0, last_pos = first_pos + nq - 1;
  const uint16_t* kp[kKB];
  const uint16_t* vp[kKB];
  for (int64_t t0 = 0; t0 <= last_pos; t0 += kKB) {
    const int nk = (int)(last_pos + 1 - t0 < kKB ? last_pos + 1 - t0 : kKB);
    tile_rows(a, g, t0, nk, kp, vp);
    // ktp [pairs][32]: 16 x 16 transposes of 32-bit lanes (a pair of dimensions each).
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      for (int half = 0; half < 2; ++half) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(kp[16 * half + i] + 2 * p0);
        rs::transpose16x16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(ktp + (p0 + i) * kKB + 16 * half, r[i]);
      }
    }
    rs::even_passes<kPassRows>(rows, [&](auto n, int64_t i) {
      const uint16_t* qb = (const uint16_t*)(qp + i * pairs);  // rows of hd bf16
      rs::panel_bf16<decltype(n)::value>(qb, hd, ktp, pairs, s + i * kKB, kKB, kKB);
    });
    const bool mask = t0 + kKB - 1 > first_pos || nk < kKB;
    for (int r = 0; r < rows; ++r) {
      __m512 z0, z1;
      const float alpha =
          online_softmax(s + r * kKB, a.scale, first_pos + r / G, t0, nk, mask, m[r], o + r * hd, hd, z0, z1);
      // The probabilities as P @ V takes them, rounded to bf16 (pairs of keys), and their sum.
      const __m512i pw = (__m512i)_mm512_cvtne2ps_pbh(z1, z0);
      _mm512_storeu_si512(pp + r * 16, pw);
      const __m512 r0 = _mm512_castsi512_ps(_mm512_slli_epi32(pw, 16));
      const __m512 r1 = _mm512_castsi512_ps(_mm512_and_si512(pw, _mm512_set1_epi32((int)0xffff0000u)));
      l[r] = l[r] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(r0, r1));
    }
    // vpair: key pairs (2j, 2j + 1) interleaved by dimension; a masked key's probability is
    // 0 and its value row a copy of a valid one (finite), so it adds nothing.
    const int npairs = (nk + 1) / 2;
    for (int j = 0; j < npairs; ++j) {
      for (int64_t c = 0; c < vecs; ++c) {
        const __m512i va = _mm512_loadu_si512(vp[2 * j] + 32 * c);
        const __m512i vb = _mm512_loadu_si512(vp[2 * j + 1] + 32 * c);
        _mm512_storeu_si512(vpair + (j * 2 * vecs + 2 * c) * 16, _mm512_permutex2var_epi16(va, ilo, vb));
        _mm512_storeu_si512(vpair + (j * 2 * vecs + 2 * c + 1) * 16, _mm512_permutex2var_epi16(va, ihi, vb));
      }
    }
    if (hd == 64) values_rows_bf16<4>(rows, pp, vpair, npairs, hd, o);
    else if (hd == 32) values_rows_bf16<2>(rows, pp, vpair, npairs, hd, o);
    else if (hd == 96) values_rows_bf16<6>(rows, pp, vpair, npairs, hd, o);
    else values_rows_bf16<8>(rows, pp, vpair, npairs, hd, o);
  }
  store_rows(a, q0, g, rows, o, l);
}
#endif

#endif

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The task of a bf16 pool on AMX tiles, for head_dim % 32 == 0 (at most 128) and at most 32
// rows (4 query heads a KV head): the scores and P @ V as tile products, bf16 operands and
// fp32 sums (as prefill_task_bf16's vdpbf16ps: the queries rounded to bf16 for the scores,
// the probabilities rounded to bf16 for P @ V). The scores come out transposed, keys x rows:
// a tile's 32 keys are the A tiles (their rows as the pool holds them), the task's queries
// the B tiles (transposed once a task), so the online softmax runs across 16 rows a vector
// (max, exp and sums per key, no reduction within a row); the probabilities, paired by key
// and transposed back, are the A tiles of P @ V, whose B tiles interleave each pair of value
// rows ([key pair][dim][2]). Rows past the task's (to 32) are zero queries.
constexpr int kAmxRows = 32;

bool amx_task_fits(int64_t G, int64_t hd) {
  return hd % 32 == 0 && hd <= 128 && G * kQB <= kAmxRows && rs::amx_usable();
}

// 16-bit lanes: a's i-th value, then b's, for i = 0..15 (b's lanes numbered from `b`).
inline __m512i pair_lanes(int b) {
  alignas(64) uint16_t idx[32];
  for (int i = 0; i < 16; ++i) idx[2 * i] = (uint16_t)i, idx[2 * i + 1] = (uint16_t)(b + i);
  return _mm512_load_si512(idx);
}

// The calling thread has loaded rs::load_tile_config.
void prefill_task_amx(const Args<uint16_t>& a, int64_t q0, int64_t g) {
  const int64_t hd = a.hd, G = a.heads / a.kv_heads, chunks = hd / 32;
  const int nq = (int)(a.query_len - q0 < kQB ? a.query_len - q0 : kQB);
  const int rows = nq * (int)G;  // row r: query q0 + r / G, head g * G + r % G
  const int halves = rows > 16 ? 2 : 1;  // B tiles of 16 rows (scores), A tiles (P @ V)
  static thread_local rs::AlignedVector<uint16_t> hbuf;  // keys [32][hd], pb [32][32]
  static thread_local rs::AlignedVector<uint32_t> tbuf;  // qt [chunks][2][16][16], vb [hd / 16][16][16]
  static thread_local rs::AlignedVector<float> fbuf;     // st [32][32], o [32][hd], pv [32][32]
  if ((int64_t)hbuf.size() < kKB * hd + kAmxRows * kKB) hbuf.resize(kKB * hd + kAmxRows * kKB);
  if ((int64_t)tbuf.size() < 3 * hd * 16) tbuf.resize(3 * hd * 16);
  if ((int64_t)fbuf.size() < kAmxRows * (2 * kKB + hd)) fbuf.resize(kAmxRows * (2 * kKB + hd));
  uint16_t* kbuf = hbuf.data();
  uint16_t* pb = kbuf + kKB * hd;
  uint32_t* qt = tbuf.data();
  uint32_t* vb = qt + 2 * hd * 16;
  float* st = fbuf.data();
  float* o = st + kKB * kAmxRows;
  float* pv = o + kAmxRows * hd;
  // The queries as B tiles: chunk c of 32 dims, rows 16 h ..: [dim pair][row], rows past
  // the task's zero.
  {
    static thread_local rs::AlignedVector<uint16_t> qb;
    if ((int64_t)qb.size() < kAmxRows * hd) qb.resize(kAmxRows * hd);
    std::memset(qb.data(), 0, kAmxRows * hd * sizeof(uint16_t));
    for (int r = 0; r < rows; ++r) {
      rs::fp32_to_bf16(a.q + (q0 + r / G) * a.ldq + (g * G + r % G) * hd, hd, qb.data() + r * hd);
    }
    for (int64_t c = 0; c < chunks; ++c) {
      for (int h = 0; h < 2; ++h) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(qb.data() + (16 * h + i) * hd + 32 * c);
        rs::transpose16x16(r);
        for (int p = 0; p < 16; ++p) _mm512_store_si512(qt + ((c * 2 + h) * 16 + p) * 16, r[p]);
      }
    }
  }
  for (int64_t i = 0; i < kAmxRows * hd; ++i) o[i] = 0.0f;
  const int64_t first_pos = a.num_computed + q0, last_pos = first_pos + nq - 1;
  // Each row's position (rows past the task's: the last one's), its running max and sum.
  __m512i pos[2];
  __m512 m[2], l[2];
  for (int h = 0; h < 2; ++h) {
    alignas(64) int32_t p16[16];
    for (int i = 0; i < 16; ++i) {
      const int r = 16 * h + i < rows ? 16 * h + i : rows - 1;
      p16[i] = (int32_t)(first_pos + r / G);
    }
    pos[h] = _mm512_load_si512(p16);
    m[h] = _mm512_set1_ps(-INFINITY);
    l[h] = _mm512_setzero_ps();
  }
  const __m512i interleave = pair_lanes(32), interleave_halves = pair_lanes(16);
  const __m512 vscale = _mm512_set1_ps(a.scale);
  const uint16_t* kp[kKB];
  const uint16_t* vp[kKB];
  for (int64_t t0 = 0; t0 <= last_pos; t0 += kKB) {
    const int nk = (int)(last_pos + 1 - t0 < kKB ? last_pos + 1 - t0 : kKB);
    tile_rows(a, g, t0, nk, kp, vp);
    for (int i = 0; i < kKB; ++i) {
      for (int64_t d = 0; d < hd; d += 32) {
        _mm512_store_si512(kbuf + i * hd + d, _mm512_loadu_si512(kp[i] + d));
      }
    }
    // Scores, keys x rows: C tiles 0 / 1 keys 0-15 x rows 0-15 / 16-31, 2 / 3 keys 16-31.
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(4, kbuf + 32 * c, hd * 2);
      _tile_loadd(5, kbuf + 16 * hd + 32 * c, hd * 2);
      _tile_loadd(6, qt + (c * 2) * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (halves == 2) {
        _tile_loadd(7, qt + (c * 2 + 1) * 256, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, st, kAmxRows * 4);
    _tile_stored(2, st + 16 * kAmxRows, kAmxRows * 4);
    if (halves == 2) {
      _tile_stored(1, st + 16, kAmxRows * 4);
      _tile_stored(3, st + 16 * kAmxRows + 16, kAmxRows * 4);
    }
    // The online softmax, 16 rows a vector: key k is seen by the rows whose position is at
    // least t0 + k (and is a key of the tile: k < nk).
    for (int h = 0; h < halves; ++h) {
      __mmask16 seen[kKB];
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int k = 0; k < kKB; ++k) {
        seen[k] = k < nk ? _mm512_cmpge_epi32_mask(pos[h], _mm512_set1_epi32((int32_t)(t0 + k)))
                         : (__mmask16)0;
        const __m512 sk = _mm512_mul_ps(_mm512_loadu_ps(st + k * kAmxRows + 16 * h), vscale);
        mx = _mm512_mask_max_ps(mx, seen[k], mx, sk);
      }
      const __m512 m_new = _mm512_max_ps(m[h], mx);
      // 0 for a row's first keys (m = -inf: exp16 gives ~1e-38, times a zero sum and output)
      const __m512 alpha = exp16(_mm512_sub_ps(m[h], m_new));
      m[h] = m_new;
      __m512 sum = _mm512_setzero_ps();
      __m512i z[16];
      for (int p = 0; p < 16; ++p) {
        __m512 pk[2];
        for (int e = 0; e < 2; ++e) {
          const int k = 2 * p + e;
          const __m512 sk = _mm512_mul_ps(_mm512_loadu_ps(st + k * kAmxRows + 16 * h), vscale);
          pk[e] = _mm512_maskz_mov_ps(seen[k], exp16(_mm512_sub_ps(sk, m_new)));
          sum = _mm512_add_ps(sum, pk[e]);
        }
        // Lane r: row r's probabilities of keys 2p and 2p + 1, bf16.
        z[p] = _mm512_permutexvar_epi16(interleave_halves, (__m512i)_mm512_cvtne2ps_pbh(pk[1], pk[0]));
      }
      l[h] = _mm512_add_ps(_mm512_mul_ps(l[h], alpha), sum);
      rs::transpose16x16(z);  // z[r]: row r's 16 key pairs
      alignas(64) float al[16];
      _mm512_store_ps(al, alpha);
      for (int i = 0; i < 16; ++i) {
        _mm512_store_si512(pb + (16 * h + i) * kKB, z[i]);
        const int r = 16 * h + i;
        if (r >= rows || al[i] == 1.0f) continue;
        const __m512 va = _mm512_set1_ps(al[i]);
        for (int64_t d = 0; d < hd; d += 16) {
          _mm512_storeu_ps(o + r * hd + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * hd + d), va));
        }
      }
    }
    // The values as B tiles: dims 16 j .. 16 j + 15, [key pair][dim][2].
    for (int p = 0; p < 16; ++p) {
      for (int64_t j = 0; j < hd / 16; ++j) {
        const __m512i v0 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(vp[2 * p] + 16 * j)));
        const __m512i v1 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(vp[2 * p + 1] + 16 * j)));
        _mm512_store_si512(vb + (j * 16 + p) * 16, _mm512_permutex2var_epi16(v0, interleave, v1));
      }
    }
    // P @ V, 32 dims a pass: C tiles 0 / 1 rows 0-15 x dims 0-15 / 16-31 of the pass.
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_loadd(4, pb, kKB * 2);
      _tile_loadd(6, vb + (2 * c) * 256, 64);
      _tile_loadd(7, vb + (2 * c + 1) * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_stored(0, pv, kKB * 4);
      _tile_stored(1, pv + 16, kKB * 4);
      if (halves == 2) {
        _tile_zero(2);
        _tile_zero(3);
        _tile_loadd(5, pb + 16 * kKB, kKB * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        _tile_stored(2, pv + 16 * kKB, kKB * 4);
        _tile_stored(3, pv + 16 * kKB + 16, kKB * 4);
      }
      for (int r = 0; r < rows; ++r) {
        float* orow = o + r * hd + 32 * c;
        _mm512_storeu_ps(orow, _mm512_add_ps(_mm512_loadu_ps(orow), _mm512_loadu_ps(pv + r * kKB)));
        _mm512_storeu_ps(orow + 16, _mm512_add_ps(_mm512_loadu_ps(orow + 16), _mm512_loadu_ps(pv + r * kKB + 16)));
      }
    }
  }
  float lr[kAmxRows];
  _mm512_storeu_ps(lr, l[0]);
  _mm512_storeu_ps(lr + 16, l[1]);
  store_rows(a, q0, g, rows, o, lr);
}
#endif

#if defined(__AVX512F__)
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
template <class T>
bool runs_on_tiles(const Args<T>& a) {
  return std::is_same_v<T, uint16_t> && amx_task_fits(a.heads / a.kv_heads, a.hd);
}
#endif

// Tasks of a row: a block of kQB queries of a KV head each.
inline int64_t num_tasks(int64_t query_len, int64_t kv_heads) {
  return (query_len + kQB - 1) / kQB * kv_heads;
}

// Task t of a row's num_tasks: the later query blocks (more keys) first, so that dynamic
// scheduling ends on the short ones. On tiles the calling thread has loaded
// rs::load_tile_config.
template <class T>
void run_task(const Args<T>& a, int64_t t) {
  const int64_t qblocks = num_tasks(a.query_len, 1);
  const int64_t qb = qblocks - 1 - t / a.kv_heads, g = t % a.kv_heads;
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (runs_on_tiles(a)) {
      prefill_task_amx(a, qb * kQB, g);
      return;
    }
  }
#endif
#if defined(__AVX512BF16__) && !defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (bf16_task_fits(a.hd)) {
      prefill_task_bf16(a, qb * kQB, g);
      return;
    }
  }
#endif
  prefill_task(a, qb * kQB, g);
}
#endif

// 0 when the kernel takes the shape (see the entry points' codes).
inline int check_shape(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t query_len,
                       int64_t ldq) {
  if (kv_heads < 1 || heads % kv_heads != 0 || query_len < 1) return 1;
  if (ldq < heads * head_dim) return 3;
#if defined(__AVX512F__)
  if (head_dim % 16 != 0 || heads / kv_heads > kMaxG) return 2;
  return 0;
#else
  return 2;
#endif
}

template <class T>
int prefill_attention(const float* q, int64_t ldq, const T* k_cache, const T* v_cache,
                      const int64_t* block_ids, int64_t num_computed, int64_t query_len,
                      int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                      float scale, float* out, int nthreads) {
  if (nthreads < 1) return 1;
  if (const int rc = check_shape(heads, kv_heads, head_dim, query_len, ldq)) return rc;
#if defined(__AVX512F__)
  const Args<T> a{q,         ldq,        k_cache, v_cache, block_ids, num_computed, query_len,
                  heads,     kv_heads,   head_dim, block_size, scale, out};
  const int64_t tasks = num_tasks(query_len, kv_heads);
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  const bool amx = runs_on_tiles(a);
#endif
  // Later query blocks see more keys: dynamic scheduling, the longest first.
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tasks > 1)
  {
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx) rs::load_tile_config();  // once a thread, not once a task
#endif
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) run_task(a, t);
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx) _tile_release();
#endif
  }
  return 0;
#else
  (void)q, (void)k_cache, (void)v_cache, (void)block_ids, (void)num_computed, (void)block_size,
      (void)scale, (void)out;
  return 2;
#endif
}

// Tasks [t_begin, t_end) of one row on the calling thread (model_step.cpp's threads share a
// step's prefill rows task by task).
template <class T>
int prefill_attention_tasks(const float* q, int64_t ldq, const T* k_cache, const T* v_cache,
                            const int64_t* block_ids, int64_t num_computed, int64_t query_len,
                            int64_t heads, int64_t kv_heads, int64_t head_dim,
                            int64_t block_size, float scale, float* out, int64_t t_begin,
                            int64_t t_end) {
  if (const int rc = check_shape(heads, kv_heads, head_dim, query_len, ldq)) return rc;
#if defined(__AVX512F__)
  const Args<T> a{q,         ldq,        k_cache, v_cache, block_ids, num_computed, query_len,
                  heads,     kv_heads,   head_dim, block_size, scale, out};
  const int64_t tasks = num_tasks(query_len, kv_heads);
  if (t_begin < 0 || t_end > tasks) return 1;
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  const bool amx = runs_on_tiles(a);
  if (amx) rs::load_tile_config();
#endif
  for (int64_t t = t_begin; t < t_end; ++t) run_task(a, t);
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (amx) _tile_release();
#endif
  return 0;
#else
  (void)q, (void)k_cache, (void)v_cache, (void)block_ids, (void)num_computed, (void)block_size,
      (void)scale, (void)out, (void)t_begin, (void)t_end;
  return 2;
#endif
}

}  // namespace

extern "C" {

// Whether this build has the kernel (AVX-512).
int rs_has_prefill_attention() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// Whether a bf16 pool's products are bf16 for this shape here: on AMX tiles (a build for a
// CPU with AMX-BF16, the tiles usable, head_dim % 32 == 0 up to 128, at most 4 query heads a
// KV head) or by vdpbf16ps (an AVX512-BF16 build for a CPU without AMX, head_dim 32, 64, 96
// or 128); otherwise fp32 over the widened pool.
int rs_prefill_attention_bf16_products(int64_t heads, int64_t kv_heads, int64_t head_dim) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (kv_heads < 1 || heads % kv_heads != 0 || heads / kv_heads > kMaxG || head_dim % 16 != 0) {
    return 0;
  }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return amx_task_fits(heads / kv_heads, head_dim) ? 1 : 0;
#else
  return bf16_task_fits(head_dim) ? 1 : 0;
#endif
#else
  (void)heads, (void)kv_heads, (void)head_dim;
  return 0;
#endif
}

// q [query_len, heads, head_dim] fp32 with ldq floats from one token's to the next's (a view
// of the QKV projection's output, not copied out of it), out the same, contiguous; pools as
// the decode kernel's; block_ids: the row's block table (enough blocks for num_computed +
// query_len tokens). 0 on success; 1: heads not a multiple of kv_heads (or no queries); 2: a
// shape or build the kernel does not take; 3: ldq below heads * head_dim.
int rs_paged_prefill_attention(const float* q, int64_t ldq, const float* k_cache,
                               const float* v_cache,
                               const int64_t* block_ids, int64_t num_computed, int64_t query_len,
                               int64_t heads, int64_t kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, float* out, int nthreads) {
  return prefill_attention(q, ldq, k_cache, v_cache, block_ids, num_computed, query_len, heads,
                           kv_heads, head_dim, block_size, scale, out, nthreads);
}

// Tasks a row of query_len queries splits into (rs_paged_prefill_attention_tasks's range).
int64_t rs_prefill_attention_num_tasks(int64_t query_len, int64_t kv_heads) {
#if defined(__AVX512F__)
  return num_tasks(query_len, kv_heads);
#else
  (void)query_len, (void)kv_heads;
  return 0;
#endif
}

// rs_paged_prefill_attention's tasks [t_begin, t_end) of the row, on the calling thread; a
// pool of bf16 bits with kv_bf16. Every task writes its own part of out, whichever thread
// runs it: the row's result is rs_paged_prefill_attention's bit for bit. Codes as there; 1
// also for a task range outside [0, rs_prefill_attention_num_tasks).
int rs_paged_prefill_attention_tasks(const float* q, int64_t ldq, const void* k_cache,
                                     const void* v_cache, int kv_bf16, const int64_t* block_ids,
                                     int64_t num_computed, int64_t query_len, int64_t heads,
                                     int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                     float scale, float* out, int64_t t_begin, int64_t t_end) {
  if (kv_bf16) {
    return prefill_attention_tasks(q, ldq, (const uint16_t*)k_cache, (const uint16_t*)v_cache,
                                   block_ids, num_computed, query_len, heads, kv_heads,
                                   head_dim, block_size, scale, out, t_begin, t_end);
  }
  return prefill_attention_tasks(q, ldq, (const float*)k_cache, (const float*)v_cache,
                                 block_ids, num_computed, query_len, heads, kv_heads, head_dim,
                                 block_size, scale, out, t_begin, t_end);
}

int rs_paged_prefill_attention_bf16(const float* q, int64_t ldq, const uint16_t* k_cache,
                                    const uint16_t* v_cache, const int64_t* block_ids,
                                    int64_t num_computed, int64_t query_len, int64_t heads,
                                    int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                    float scale, float* out, int nthreads) {
  return prefill_attention(q, ldq, k_cache, v_cache, block_ids, num_computed, query_len, heads,
                           kv_heads, head_dim, block_size, scale, out, nthreads);
}

}  // extern "C"
