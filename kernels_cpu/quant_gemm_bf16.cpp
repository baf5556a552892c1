// The quantized GEMM in bf16 (AVX512-BF16): y = x @ W.T with x rounded to bf16, W's blocks
// dequantized (fp32, as dequant_row) and rounded to bf16, products summed in fp32 by
// vdpbf16ps, y written in fp32. What a bf16 matmul of a step of many rows runs on a CPU that
// has the instruction (quant_layers.py: matmul_dtype bfloat16), in place of oneDNN's bf16
// matmul over a dequantized tile: no separate dequantization pass, no weight reorder, no bf16
// result to widen back (those cost oneDNN's path half its time on a 32-row decode step).
//
// Each thread takes 32 weight rows (output columns) at a time, dequantizes them into a
// panel in the instruction's layout, [k / 2][32 columns] pairs of bf16 (a 16 x 16 transpose
// of 32-bit pairs per 16 rows and block), and runs an outer-product micro-kernel over it:
// MT activation rows x 32 columns, 2 * MT fp32 accumulators, one broadcast pair of x a row
// and two panel loads a k pair. Without AVX512-BF16 the entry point returns 3 and the caller
// takes the oneDNN path.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include <omp.h>

#include "panel_kernels.h"
#include "quant_blocks.h"

using namespace rs;

namespace {

// A Q8_0 weight's blocks regrouped in the panels' order ("Q8 panels"), for a weight that a
// caller keeps twice (the LM head): a product turns each into its bf16 panel with no
// transpose (~30% of pack_panel's time on cache-resident weights) and no scalar scale. Per
// panel of 32 columns and block b of 32 values: the columns' 32 fp16 scales (64 bytes), then
// for each of the block's 16 pairs of values and each half of the columns, 32 int8:
// (w[c][2p], w[c][2p + 1]) for the half's columns c in order: 1,088 bytes where the blocks
// hold 1,088. Columns past n are zero.
constexpr int64_t kQ8PanelBlockBytes = 64 + 16 * 2 * 32;
}  // namespace

#if defined(__AVX512BF16__) && defined(__AVX512VL__)
namespace {

constexpr int kPanelCols = kPanelWidth;
constexpr int kMaxRows = 12;  // rows a pass: 24 accumulators, 2 panel vectors, 1 broadcast

// Block b of a weight row as 16 pairs of bf16 (values 2p, 2p + 1 in pair p), each value
// dequant_row's fp32 rounded to nearest even.
template <int WType>
inline __m512i block_pairs(const uint8_t* w, int64_t b) {
  __m512 lo, hi;
  dequant_block16x2<WType>(w, b, lo, hi);
  // cvtne2ps: the second operand's 16 values are the low half of the result, in order.
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// Weight rows [r0, r1) (at most 32) into panel [k / 2][32] pairs; columns past r1 zero.
template <int WType>
void pack_panel(const uint8_t* w, int64_t k, int64_t r0, int64_t r1, uint32_t* panel) {
  const int64_t nb = k / QK, row_bytes = nb * block_bytes(WType);
  prefetch_bytes(w + r0 * row_bytes, (r1 - r0) * row_bytes);
  for (int half = 0; half < 2; ++half) {
    const int64_t first = r0 + 16 * half;
    for (int64_t b = 0; b < nb; ++b) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        r[j] = first + j < r1 ? block_pairs<WType>(w + (first + j) * row_bytes, b)
                              : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int p = 0; p < 16; ++p) {
        _mm512_storeu_si512(panel + (b * 16 + p) * kPanelCols + 16 * half, r[p]);
      }
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX (Intel Sapphire Rapids and later): the same product on tile multiplies, 2.5-4x the
// rate of vdpbf16ps there (whose throughput is low on those cores). The weight rows are the
// A tiles: 16 rows x one 32-value block each, dequantized and rounded to bf16 in place, so no
// transpose; x, in pairs of bf16 blocked as [m / 16][k / 2][16], is the B tiles; each C tile
// holds 16 weight rows x 16 rows of x and is transposed on its way to y. Products are summed
// in fp32 as vdpbf16ps's are (not in the same order: results differ in the last bits).
int g_amx_enabled = 1;

bool amx_permitted() {  // Linux hands out the tile state only on request (XTILEDATA, 18)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
  return ok;
}

// Rows of x (bf16, rows of k) as [m / 16][k / 2][16] pairs; rows past m zero.
uint32_t* vnni_rows(const uint16_t* xb, int64_t m, int64_t k) {
  static thread_local AlignedVector<uint32_t> buf;
  const int64_t mb_count = (m + 15) / 16, kp = k / 2;
  if ((int64_t)buf.size() < mb_count * kp * 16) buf.resize(mb_count * kp * 16);
  for (int64_t mb = 0; mb < mb_count; ++mb) {
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = mb * 16 + i;
        r[i] = row < m ? _mm512_loadu_si512(xb + row * k + 2 * p0) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(buf.data() + (mb * kp + p0 + p) * 16, r[p]);
    }
  }
  return buf.data();
}

// Weight rows [r0, r1) (at most 32) dequantized and rounded to bf16, rows of k; rows past r1 zero.
template <int WType>
void pack_rows_bf16(const uint8_t* w, int64_t k, int64_t r0, int64_t r1, uint16_t* a) {
  const int64_t nb = k / QK, row_bytes = nb * block_bytes(WType);
  for (int j = 0; j < kPanelCols; ++j) {
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i v = r0 + j < r1 ? block_pairs<WType>(w + (r0 + j) * row_bytes, b)
                                    : _mm512_setzero_si512();
      _mm512_storeu_si512(a + j * k + b * QK, v);
    }
  }
}

// A C tile stored as c [16 weight rows][16 rows of x], into y's rows m0.. (those < m) and
// its first nv columns.
inline void store_transposed(const float* c, float* y, int64_t ldy, int64_t m0, int64_t m, int nv) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + 16 * i);
  transpose16x16(r);
  const __mmask16 mask = first_lanes(nv);
  for (int i = 0; i < 16 && m0 + i < m; ++i) {
    _mm512_mask_storeu_ps(y + (m0 + i) * ldy, mask, _mm512_castsi512_ps(r[i]));
  }
}

template <int WType>
void gemm_amx(const uint8_t* w, int64_t n, int64_t k, const uint16_t* xb, int64_t m, float* y,
              int64_t ldy, int nthreads, int64_t r_begin, int64_t r_end) {
  const int64_t mb_count = (m + 15) / 16, kp = k / 2;
  const uint32_t* xt = vnni_rows(xb, m, k);
  const bool parallel = worth_threads(n, k, m, nthreads);
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
    load_tile_config();
    static thread_local AlignedVector<uint16_t> panel;
    if ((int64_t)panel.size() < kPanelCols * k) panel.resize(kPanelCols * k);
    const uint16_t* a = panel.data();
    alignas(64) float c[4][256];
#pragma omp for schedule(dynamic)
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kPanelCols) {
      const int64_t r1 = r0 + kPanelCols < r_end ? r0 + kPanelCols : r_end;
      const int nv = (int)(r1 - r0);
      pack_rows_bf16<WType>(w, k, r0, r1, panel.data());
      for (int64_t mb = 0; mb < mb_count; mb += 2) {
        const bool two = mb + 1 < mb_count;  // a second block of 16 rows of x
        const uint32_t* b0 = xt + mb * kp * 16;
        const uint32_t* b1 = two ? b0 + kp * 16 : b0;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < k / QK; ++s) {
          _tile_loadd(4, a + s * QK, k * 2);
          _tile_loadd(5, a + 16 * k + s * QK, k * 2);
          _tile_loadd(6, b0 + s * 256, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (two) {
            _tile_loadd(7, b1 + s * 256, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(2, c[2], 64);
        store_transposed(c[0], y + r0, ldy, mb * 16, m, nv);
        store_transposed(c[2], y + r0 + 16, ldy, mb * 16, m, nv - 16);
        if (two) {
          _tile_stored(1, c[1], 64);
          _tile_stored(3, c[3], 64);
          store_transposed(c[1], y + r0, ldy, mb * 16 + 16, m, nv);
          store_transposed(c[3], y + r0 + 16, ldy, mb * 16 + 16, m, nv - 16);
        }
      }
    }
    _tile_release();
  }
}

// From this many rows of x, the roles turn: the rows of x are the A tiles as they are (bf16
// rows of k), the weight is the B tiles, packed once per call in the vdpbf16ps panels'
// layout ([k / 2][32] pairs: a panel's columns 0-15 and 16-31 are two B tiles, rows 128
// bytes apart), and each C tile [16 rows of x][16 columns] goes straight into y. gemm_amx
// above re-reads all of x (bf16, k values a row) for each panel of 32 columns and transposes
// each C tile on its way out: past a few hundred rows x leaves the L2 cache (2,048 rows of
// 576 are 2.4 MB) and both costs grow with the rows, where this one's transposing pack is
// paid once per weight row. A 2-core Emerald Rapids VM, 2 threads, 30 layers' Q4_1 weights
// (tools/bench_quant.py's shapes), the two paths in turn: 2,048 rows 450 -> 369 ms, 512 rows
// 97 -> 89 ms, 256 rows even (53 ms), 128 rows 31 -> 34 ms; with the runs of panels below,
// 2,048 rows 311 -> 250 ms.
constexpr int64_t kAmxManyRows = 256;
// x's rows in chunks of at most this many bytes (bf16), kept in L2 while the panels pass.
constexpr int64_t kXChunkBytes = 512 << 10;
// Packed panels a thread runs its chunk of x's rows over at a time (kept in L2 with the chunk).
constexpr int64_t kRunBytes = 768 << 10;
// Packed weight columns at most this many bytes at a time (the LM head's 49,152 columns are
// packed and used in parts).
constexpr int64_t kPackedBytes = 8 << 20;

// A C tile's rows of x [i0, m) and columns [c0, n) from c (the tile stored as 16 x 16) into y.
inline void store_partial(const float* c, float* y, int64_t ldy, int64_t i0, int64_t m,
                          int64_t c0, int64_t n) {
  if (i0 >= m || c0 >= n) return;
  const __mmask16 mask = first_lanes(n - c0);
  for (int64_t i = 0; i < 16 && i0 + i < m; ++i) {
    _mm512_mask_storeu_ps(y + (i0 + i) * ldy + c0, mask, _mm512_loadu_ps(c + 16 * i));
  }
}

// C tile T (rows of x i0.., columns c0..) into y: straight where it is whole, else through c.
// (A macro: the tile intrinsics take the tile's number as a literal.)
#define RS_STORE_C(T, i0, c0)                                    \
  do {                                                           \
    if ((i0) + 16 <= m && (c0) + 16 <= n) {                      \
      _tile_stored(T, y + (i0) * ldy + (c0), ldy * 4);           \
    } else {                                                     \
      _tile_stored(T, c, 64);                                    \
      store_partial(c, y, ldy, (i0), m, (c0), n);                \
    }                                                            \
  } while (0)

// y [m, n] for m >= kAmxManyRows; xb has m rows of k rounded up to 32 rows, the extra rows zero.
template <int WType>
void gemm_amx_many_rows(const uint8_t* w, int64_t n, int64_t k, const uint16_t* xb, int64_t m,
                        float* y, int64_t ldy, int nthreads) {
  const int64_t nb = k / QK, panel_words = k / 2 * kPanelCols;
  const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
  const int64_t group = std::max<int64_t>(1, kPackedBytes / (panel_words * 4));
  const int64_t chunk_rows = std::max<int64_t>(32, kXChunkBytes / (k * 2) / 32 * 32);
  const int64_t run_panels = std::max<int64_t>(1, kRunBytes / (panel_words * 4));
  const int64_t chunks = (m + chunk_rows - 1) / chunk_rows;
  static thread_local AlignedVector<uint32_t> packed;
  const int64_t cap = std::min(group, panels) * panel_words;
  if ((int64_t)packed.size() < cap) packed.resize(cap);
  uint32_t* pk = packed.data();
  for (int64_t g0 = 0; g0 < panels; g0 += group) {
    const int64_t g1 = std::min(panels, g0 + group), gp = g1 - g0;
    // Tasks: a chunk of x's rows times a run of the group's panels; runs split so that each
    // thread has at least two tasks to take.
    const int64_t runs = std::min(gp, std::max<int64_t>(1, (2 * nthreads + chunks - 1) / chunks));
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
      for (int64_t p = g0; p < g1; ++p) {
        const int64_t r0 = p * kPanelCols, r1 = std::min(n, r0 + kPanelCols);
        pack_panel<WType>(w, k, r0, r1, pk + (p - g0) * panel_words);
      }
      load_tile_config();
      alignas(64) float c[256];
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < chunks * runs; ++t) {
        const int64_t i_begin = t / runs * chunk_rows, i_end = std::min(m, i_begin + chunk_rows);
        const int64_t p_begin = g0 + gp * (t % runs) / runs, p_end = g0 + gp * (t % runs + 1) / runs;
        // Panels a run at a time that stay in L2 with the chunk of x, and rows of x outer
        // within it: y is written a few rows at a time across the run's columns, not down
        // each panel's 32 columns over all the chunk's rows (a tile store writes 16 rows of
        // y, each a page apart in the model's wide outputs).
        for (int64_t q0 = p_begin; q0 < p_end; q0 += run_panels) {
          const int64_t q1 = std::min(p_end, q0 + run_panels);
          for (int64_t i0 = i_begin; i0 < i_end; i0 += 32) {
            const uint16_t* a0 = xb + i0 * k;
            const uint16_t* a1 = a0 + 16 * k;
            for (int64_t p = q0; p < q1; ++p) {
              const uint32_t* panel = pk + (p - g0) * panel_words;
              const int64_t c0 = p * kPanelCols;
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
              for (int64_t s = 0; s < nb; ++s) {
                _tile_loadd(4, a0 + s * QK, k * 2);
                _tile_loadd(5, a1 + s * QK, k * 2);
                _tile_loadd(6, panel + s * 16 * kPanelCols, kPanelCols * 4);
                _tile_loadd(7, panel + s * 16 * kPanelCols + 16, kPanelCols * 4);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
              }
              RS_STORE_C(0, i0, c0);
              RS_STORE_C(1, i0, c0 + 16);
              RS_STORE_C(2, i0 + 16, c0);
              RS_STORE_C(3, i0 + 16, c0 + 16);
            }
          }
        }
      }
      _tile_release();
    }
  }
}
#undef RS_STORE_C

bool use_amx() { return g_amx_enabled && amx_permitted(); }
#else
bool use_amx() { return false; }
#endif

// All m rows of x over one panel (weight rows [r0, r0 + nv)), in passes of at most kMaxRows
// rows, as even as they go (32 rows: 11 11 10).
// next (optional): next_bytes to bring into L2 meanwhile (the next panel's source, streamed
// from memory), spread over the first pass's steps rather than asked for at once.
inline void panel_passes(const uint16_t* xb, int64_t m, int64_t k, const uint32_t* panel,
                         float* y, int64_t ldy, int64_t r0, int nv, const void* next = nullptr,
                         int64_t next_bytes = 0) {
  const int lines = (int)((next_bytes + 64 * (k / 2) - 1) / (64 * (k / 2)));
  bool first = true;
  even_passes<kMaxRows>(m, [&](auto rows, int64_t i) {
    panel_bf16<decltype(rows)::value>(xb + i * k, k, panel, k / 2, y + i * ldy + r0, ldy, nv,
                                      first ? (const char*)next : nullptr, first ? lines : 0);
    first = false;
  });
}

template <int WType>
void gemm_bf16(const uint8_t* w, int64_t n, int64_t k, const uint16_t* xb, int64_t m, float* y,
               int64_t ldy, int nthreads, int64_t r_begin, int64_t r_end) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (use_amx()) {
    if (m >= kAmxManyRows && r_begin == 0 && r_end == n) {
      return gemm_amx_many_rows<WType>(w, n, k, xb, m, y, ldy, nthreads);
    }
    return gemm_amx<WType>(w, n, k, xb, m, y, ldy, nthreads, r_begin, r_end);
  }
#endif
  const bool parallel = worth_threads(n, k, m, nthreads);
  for_row_chunks(r_begin, r_end, kPanelCols, nthreads, parallel, [&](int64_t r0, int64_t r1) {
    static thread_local AlignedVector<uint32_t> panel;
    if ((int64_t)panel.size() < k / 2 * kPanelCols) panel.resize(k / 2 * kPanelCols);
    // The next panel's weight rows (contiguous: those a thread's run of chunks mostly goes on
    // to) are fetched over this one's first pass, not all at once as it packs: 30 layers'
    // Q4_1 weights, 2 threads, the two ways in turn in one process, 12 rows 16-17 -> 14.1-14.6
    // ms, 32 rows 27-28.6 -> 24.9-27.3 (a Zen 4 VM).
    const int64_t row_bytes = k / QK * block_bytes(WType);
    const int64_t next_end = r1 + kPanelCols < r_end ? r1 + kPanelCols : r_end;
    pack_panel<WType>(w, k, r0, r1, panel.data());
    panel_passes(xb, m, k, panel.data(), y, ldy, r0, (int)(r1 - r0),
                 r1 < r_end ? w + r1 * row_bytes : nullptr, (next_end - r1) * row_bytes);
  });
}

void pack_q8_panels(const uint8_t* w, int64_t n, int64_t k, uint8_t* out, int nthreads) {
  const int64_t nb = k / QK, row_bytes = nb * (int64_t)sizeof(BlockQ8_0);
  const int64_t np = (n + kPanelCols - 1) / kPanelCols;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t pi = 0; pi < np; ++pi) {
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* dst = out + (pi * nb + b) * kQ8PanelBlockBytes;
      uint16_t* scales = (uint16_t*)dst;
      int8_t* q = (int8_t*)(dst + 64);
      for (int c = 0; c < kPanelCols; ++c) {
        const int64_t row = pi * kPanelCols + c;
        const BlockQ8_0* blk = row < n ? (const BlockQ8_0*)(w + row * row_bytes) + b : nullptr;
        scales[c] = blk != nullptr ? blk->d : 0;
        for (int p = 0; p < 16; ++p) {
          int8_t* pair = q + (p * 2 + c / 16) * 32 + (c % 16) * 2;
          pair[0] = blk != nullptr ? blk->qs[2 * p] : 0;
          pair[1] = blk != nullptr ? blk->qs[2 * p + 1] : 0;
        }
      }
    }
  }
}

// One panel of Q8 panels into the bf16 panel [k / 2][32] pairs: each value fp32(q) * d
// rounded to bf16, as block_pairs<kQ8_0> computes it, so the products are gemm_bf16's.
void unpack_q8_panel(const uint8_t* src, int64_t nb, uint32_t* panel) {
  // Lane i of a 16-lane half takes column i / 2's scale (its pair's two values).
  const __m512i lo_cols = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
  for (int64_t b = 0; b < nb; ++b, src += kQ8PanelBlockBytes) {
    __m512 d[2][2];
    for (int h = 0; h < 2; ++h) {
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)src + h));
      d[h][0] = _mm512_permutexvar_ps(lo_cols, s);
      d[h][1] = _mm512_permutexvar_ps(hi_cols, s);
    }
    const int8_t* q = (const int8_t*)(src + 64);
    for (int p = 0; p < 16; ++p) {
      for (int h = 0; h < 2; ++h, q += 32) {
        const __m512 lo = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))),
            d[h][0]);
        const __m512 hi = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16)))),
            d[h][1]);
        // cvtne2ps: lo's 16 values (columns 0-7's pairs) first, then hi's (columns 8-15).
        _mm512_storeu_si512(panel + (b * 16 + p) * kPanelCols + 16 * h,
                            (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
}

// gemm_bf16's product (the vdpbf16ps path, bit for bit) over Q8 panels.
void gemm_bf16_q8_panels(const uint8_t* panels, int64_t n, int64_t k, const uint16_t* xb,
                         int64_t m, float* y, int64_t ldy, int nthreads) {
  const int64_t nb = k / QK;
  const bool parallel = worth_threads(n, k, m, nthreads);
  for_row_chunks(0, n, kPanelCols, nthreads, parallel, [&](int64_t r0, int64_t r1) {
    static thread_local AlignedVector<uint32_t> panel;
    if ((int64_t)panel.size() < k / 2 * kPanelCols) panel.resize(k / 2 * kPanelCols);
    const int64_t bytes = nb * kQ8PanelBlockBytes;  // a panel's
    const uint8_t* src = panels + r0 / kPanelCols * bytes;
    unpack_q8_panel(src, nb, panel.data());
    // The next panel: the one a thread's run of chunks mostly goes on to.
    panel_passes(xb, m, k, panel.data(), y, ldy, r0, (int)(r1 - r0),
                 r1 < n ? src + bytes : nullptr, r1 < n ? bytes : 0);
  });
}

// x [m, k] (row stride ldx) rounded to bf16 into this thread's buffer, rows of k.
uint16_t* bf16_rows(const float* x, int64_t m, int64_t k, int64_t ldx, int nthreads) {
  static thread_local AlignedVector<uint16_t> xbuf;
  // Rows rounded up to 32, the extra ones zero: AMX's A tiles read x 16 rows at a time.
  const int64_t padded = (m + 31) / 32 * 32;
  if ((int64_t)xbuf.size() < padded * k) xbuf.resize(padded * k);
  uint16_t* xb = xbuf.data();
  std::memset(xb + m * k, 0, (padded - m) * k * 2);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && m * k >= (1 << 16))
  for (int64_t i = 0; i < m; ++i) fp32_to_bf16(x + i * ldx, k, xb + i * k);
  return xb;
}

}  // namespace

namespace rs {
bool amx_usable() { return use_amx(); }
}  // namespace rs
#endif

extern "C" {

// Whether rs_gemm_bf16 runs here (the library was built for a CPU with AVX512-BF16).
int rs_has_bf16_gemm() {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  return 1;
#else
  return 0;
#endif
}

// Whether rs_gemm_bf16 runs on AMX tiles here (built for and permitted on a CPU with AMX-BF16).
// enable: 0 or 1 to switch the AMX path off or back on (tests compare it with vdpbf16ps),
// -1 to leave it as it is.
int rs_bf16_amx(int enable) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (enable >= 0) g_amx_enabled = enable;
  return use_amx() ? 1 : 0;
#else
  (void)enable;
  return 0;
#endif
}

// y [m, n] (row stride ldy) = bf16(x) [m, k] (row stride ldx) @ bf16(W).T. 0 on success; 1 for
// a k that is not whole blocks, 2 for an unknown type, 3 without AVX512-BF16.
int rs_gemm_bf16(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                 int64_t ldx, float* y, int64_t ldy, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if (k % QK != 0 || nthreads < 1) return 1;
  if (block_bytes(wtype) == 0) return 2;
  uint16_t* xb = bf16_rows(x, m, k, ldx, nthreads);
  return with_wtype(wtype, [&](auto t) {
    gemm_bf16<decltype(t)::value>(w, n, k, xb, m, y, ldy, nthreads, 0, n);
  });
#else
  (void)wtype, (void)w, (void)n, (void)k, (void)x, (void)m, (void)ldx, (void)y, (void)ldy,
      (void)nthreads;
  return 3;
#endif
}

// Bytes of rs_pack_q8_panels's result for an n x k Q8_0 weight.
int64_t rs_q8_panels_bytes(int64_t n, int64_t k) {
  return (n + kPanelWidth - 1) / kPanelWidth * (k / QK) * kQ8PanelBlockBytes;
}

// An n x k Q8_0 weight's blocks regrouped into Q8 panels (rs_q8_panels_bytes(n, k) bytes), for
// rs_gemm_bf16_q8_panels. 0 on success; 1 for a k that is not whole blocks, 3 without
// AVX512-BF16 (nothing here would read them).
int rs_pack_q8_panels(const uint8_t* w, int64_t n, int64_t k, uint8_t* panels, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if (k % QK != 0 || nthreads < 1) return 1;
  pack_q8_panels(w, n, k, panels, nthreads);
  return 0;
#else
  (void)w, (void)n, (void)k, (void)panels, (void)nthreads;
  return 3;
#endif
}

// rs_gemm_bf16's product over a Q8_0 weight's Q8 panels: its vdpbf16ps path's result bit for
// bit (never AMX tiles, whose weight layout differs). 3 without AVX512-BF16.
int rs_gemm_bf16_q8_panels(const uint8_t* panels, int64_t n, int64_t k, const float* x, int64_t m,
                           int64_t ldx, float* y, int64_t ldy, int nthreads) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if (k % QK != 0 || nthreads < 1) return 1;
  uint16_t* xb = bf16_rows(x, m, k, ldx, nthreads);
  gemm_bf16_q8_panels(panels, n, k, xb, m, y, ldy, nthreads);
  return 0;
#else
  (void)panels, (void)n, (void)k, (void)x, (void)m, (void)ldx, (void)y, (void)ldy, (void)nthreads;
  return 3;
#endif
}

// The same product's output columns [r_begin, r_end) only, on the calling thread, over
// activations already rounded: xb [m, k] bf16 bits (rows of k, as rs::fp32_to_bf16 rounds
// them; rows up to m rounded up to 32 readable, zero past m, where AMX tiles may read them).
// For model_step.cpp, whose threads round a step's rows once between them and then each
// take their own columns: split in multiples of 32, each thread has whole panels, and the
// results are rs_gemm_bf16's bit for bit.
int rs_gemm_bf16_cols_xb(int wtype, const uint8_t* w, int64_t n, int64_t k, const uint16_t* xb,
                         int64_t m, float* y, int64_t ldy, int64_t r_begin, int64_t r_end) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if (k % QK != 0 || r_begin < 0 || r_end > n) return 1;
  if (block_bytes(wtype) == 0) return 2;
  return with_wtype(wtype, [&](auto t) {
    gemm_bf16<decltype(t)::value>(w, n, k, xb, m, y, ldy, 1, r_begin, r_end);
  });
#else
  (void)wtype, (void)w, (void)n, (void)k, (void)xb, (void)m, (void)y, (void)ldy, (void)r_begin,
      (void)r_end;
  return 3;
#endif
}

}  // extern "C"
