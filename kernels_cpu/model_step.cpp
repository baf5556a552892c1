// A Llama model's decoder layers for one step in one call: the quantized path's steps.
//
// The layers' Python (models/llama.py) makes ~15 calls a layer into torch and kernels_cpu,
// each tens of microseconds of interpreter and dispatch around a few microseconds of work:
// on the default model that is ~30% of a single-stream decode step. This file runs the same
// kernels in the same order on the same inputs (so the hidden states are bit-identical to
// the Python path's), with the step's buffers carved out of one scratch allocation:
//   h, res = add_rms_norm(h, res, input_norm)      qkv = h @ Wqkv       rope(q, k)
//   cache[slot] = k, v                            a = paged attention   h = a @ Wo
//   h, res = add_rms_norm(h, res, post_norm)       h = down(silu(gate) * up)
// and the final norm. Attention is the paged decode kernel's, row group by row group (each
// row one query token: decode rows, and the short rows torch_paged.py splits per token), and
// prefill_attention.cpp's for longer prefill rows (an AVX-512 build; elsewhere such a step
// stays on the Python path). With bf16 GEMMs, the op before each GEMM also rounds its
// output rows to bf16 for it (rs_gemm_bf16_cols_xb), as rs_gemm_bf16 rounds its input.
//
// Threads: the whole step is one OpenMP parallel region. Each GEMM's output columns, the
// attention's rows (by the keys they attend to; a single row's keys in two ranges) and the
// small ops' rows are split between its threads, and the threads meet at a spinning barrier
// between ops. Opening a region per op, as the kernels' own entry points do, costs a wake-up
// of the sleeping threads each time (OMP_WAIT_POLICY=PASSIVE, engine_core/__init__.py): 51 us
// a region on this VM against 0.5 us spinning, ~150 regions a step. The barrier spins a
// bounded time, then sleeps, so a thread whose partner lost its core gives the core back
// (SpinBarrier).
#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "quant_blocks.h"

extern "C" {
int rs_gemm_f32(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                int64_t ldx, float* y, int64_t ldy, int nthreads);
void rs_add_rms_norm(const float* x, const float* residual, const float* weight, float* out,
                     float* residual_out, int64_t rows, int64_t h, float eps, int nthreads);
void rs_rope(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t ldx,
             const float* cos, const float* sin, int nthreads);
void rs_silu_and_mul(const float* x, float* out, int64_t tokens, int64_t n, int nthreads);
int rs_gemm_f32_cols(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                     int64_t ldx, float* y, int64_t ldy, int64_t r_begin, int64_t r_end);
int rs_gemm_bf16_cols_xb(int wtype, const uint8_t* w, int64_t n, int64_t k, const uint16_t* xb,
                         int64_t m, float* y, int64_t ldy, int64_t r_begin, int64_t r_end);
int64_t rs_prefill_attention_num_tasks(int64_t query_len, int64_t kv_heads);
int rs_paged_prefill_attention_tasks(const float* q, int64_t ldq, const void* k_cache,
                                     const void* v_cache, int kv_bf16, const int64_t* block_ids,
                                     int64_t num_computed, int64_t query_len, int64_t heads,
                                     int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                     float scale, float* out, int64_t t_begin, int64_t t_end);
int rs_paged_decode_attention_tasks(const float* q, const float* k_cache, const float* v_cache,
                                    const int64_t* block_ids, const float* bias, int64_t rows,
                                    int64_t width, int64_t heads, int64_t kv_heads,
                                    int64_t head_dim, int64_t block_size, float scale, float* out,
                                    int64_t task_begin, int64_t task_end);
int64_t rs_decode_row_keys(const float* bias, int64_t ctx);
int rs_decode_row_parts();
int rs_decode_row_split(const float* bias, int64_t width, int64_t block_size, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, int bf16);
int rs_decode_row_part(const float* q, const float* k_cache, const float* v_cache,
                       const int64_t* block_ids, const float* bias, int64_t width, int64_t heads,
                       int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale,
                       int part, float* parts);
int rs_decode_row_part_bf16(const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                            const int64_t* block_ids, const float* bias, int64_t width,
                            int64_t heads, int64_t kv_heads, int64_t head_dim,
                            int64_t block_size, float scale, int part, float* parts);
void rs_decode_row_merge(const float* parts, int64_t heads, int64_t head_dim, int64_t h0,
                         int64_t h1, float* out);
int rs_paged_decode_attention_tasks_bf16(const float* q, const uint16_t* k_cache,
                                         const uint16_t* v_cache, const int64_t* block_ids,
                                         const float* bias, int64_t rows, int64_t width,
                                         int64_t heads, int64_t kv_heads, int64_t head_dim,
                                         int64_t block_size, float scale, float* out,
                                         int64_t task_begin, int64_t task_end);
}

namespace {

// One decoder layer's weights: pointers into the model's tensors (held by Python).
struct Layer {
  const float* input_norm;
  const float* post_norm;
  const uint8_t* qkv;
  const uint8_t* o;
  const uint8_t* gate_up;
  const uint8_t* down;
  int64_t wtype_qkv, wtype_o, wtype_gate_up, wtype_down;
};

struct Model {
  int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate, block_size;
  float eps, scale;  // RMSNorm's epsilon; attention's 1/sqrt(head_dim), as Python rounds it
  const Layer* layers;
  const float* final_norm;
  // Steps of this many rows or more run the GEMMs in bf16 (QuantizedLinear.matmul_dtype);
  // 0: never.
  int64_t bf16_min_rows;
  int64_t kv_bf16;  // the KV pools hold bf16 (uint16 bits), not fp32
};

// Consecutive single-query rows attended together (torch_paged.py's DecodeGroup).
struct Group {
  int64_t start, end, width;  // rows [start, end); block table width in blocks
  const int64_t* block_ids;   // [(end - start) * width]
  const float* bias;          // [(end - start), width * block_size]
};

// A multi-token row (torch_paged.py's PrefillRow): causal attention of its queries over the
// cache's first num_computed + query_len keys of its blocks (prefill_attention.cpp).
struct Prefill {
  int64_t start, query_len, num_computed;  // tokens [start, start + query_len) of the step
  const int64_t* block_ids;                // enough blocks for num_computed + query_len keys
};

// All n threads of a region wait until each has arrived (generation counting: reusable).
// A waiter spins for up to kSpinNs, then sleeps on the generation word (a futex) until the
// last thread in wakes it: without other load the partner arrives within microseconds and
// nobody sleeps; with another process on the cores the waiter gives its core away instead
// of spinning through the partner's lost time slice.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int gen = gen_.load();
    if (count_.fetch_add(1) == n_ - 1) {
      count_.store(0);
      gen_.fetch_add(1);
      if (sleepers_.load() > 0) futex(FUTEX_WAKE_PRIVATE, INT32_MAX);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 1; gen_.load() == gen; ++spins) {
      _mm_pause();
      if (spins % 256 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
        sleepers_.fetch_add(1);
        while (gen_.load() == gen) futex(FUTEX_WAIT_PRIVATE, gen);  // returns if gen_ moved
        sleepers_.fetch_sub(1);
        return;
      }
    }
  }

 private:
  static constexpr std::chrono::microseconds kSpin{30};
  void futex(int op, int val) {
    syscall(SYS_futex, reinterpret_cast<int*>(&gen_), op, val, nullptr, nullptr, 0);
  }
  const int n_;
  std::atomic<int> count_{0}, gen_{0}, sleepers_{0};
};
static_assert(sizeof(std::atomic<int>) == sizeof(int), "the futex word is the atomic's int");

// Thread t of nth's share of [0, n), in whole chunks of `chunk`.
inline void share(int64_t n, int64_t chunk, int t, int nth, int64_t& begin, int64_t& end) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  begin = chunks * t / nth * chunk;
  end = chunks * (t + 1) / nth * chunk;
  if (begin > n) begin = n;
  if (end > n) end = n;
}

}  // namespace

extern "C" {

// h [tokens, hidden]: the step's embeddings in, the final norm's output out (in place).
// kv: [layers, 2, blocks, block_size, kv_heads, head_dim] fp32 (bf16 with m->kv_bf16);
// slots [tokens]; cos/sin [tokens, head_dim / 2]; every token in one group or prefill row
// (the caller checks). 0 on success; -1 a bad shape, 2 a weight type the GEMM does not take
// or a build without the prefill kernel (both checked before any work), 1 a kernel that
// refused its arguments.
int rs_llama_layers(const Model* m, float* h, int64_t tokens, void* kv, int64_t kv_blocks,
                    const int64_t* slots, const float* cos, const float* sin, const Group* groups,
                    int64_t num_groups, const Prefill* prefills, int64_t num_prefills,
                    int nthreads) {
  if (tokens < 1 || m->heads % m->kv_heads) return -1;
  const int64_t hd = m->head_dim, hidden = m->hidden, inter = m->intermediate;
  const int64_t q_width = m->heads * hd, kv_width = m->kv_heads * hd;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const int64_t pool = kv_blocks * m->block_size * kv_width;  // floats of one K or V pool
  const bool bf16 = m->bf16_min_rows > 0 && tokens >= m->bf16_min_rows;
  static thread_local rs::AlignedVector<float> scratch;
  // A single row's attention in key ranges, merged (paged_attention.cpp's rs_decode_row_*):
  // one part a thread rather than its 3 KV heads over 2 threads.
  const int row_parts =
      tokens == 1 && num_groups == 1 && num_prefills == 0 &&
              rs_decode_row_split(groups[0].bias, groups[0].width, m->block_size, m->heads,
                                  m->kv_heads, m->head_dim, (int)m->kv_bf16)
          ? rs_decode_row_parts()
          : 0;
  // With bf16 GEMMs, each GEMM's activations rounded once into xb by the op before it (its
  // rows split between the threads, as rs_gemm_bf16 rounds them), not by every thread for
  // itself: rows rounded up to 32, the extra ones zero (AMX tiles read 16 rows at a time).
  const int64_t padded = (tokens + 31) / 32 * 32;
  const int64_t widest = std::max(std::max(hidden, q_width), inter);
  const int64_t xb_floats = bf16 ? (padded * widest + 1) / 2 : 0;
  // The step's buffers, each starting on a cache line (rs::whole_lines).
  const int64_t sizes[] = {tokens * hidden,    tokens * hidden,  tokens * qkv_width,
                           tokens * q_width,   tokens * q_width, tokens * 2 * inter,
                           tokens * inter,     row_parts * m->heads * (m->head_dim + 2),
                           xb_floats};
  constexpr int kBuffers = sizeof(sizes) / sizeof(sizes[0]);
  int64_t need = 0;
  for (int64_t n : sizes) need += rs::whole_lines<float>(n);
  if ((int64_t)scratch.size() < need) scratch.resize(need);
  float* buffers[kBuffers];
  for (int i = 0, at = 0; i < kBuffers; at += (int)rs::whole_lines<float>(sizes[i]), ++i) {
    buffers[i] = scratch.data() + at;
  }
  float *res = buffers[0], *normed = buffers[1], *qkv = buffers[2], *q = buffers[3];
  float *attn = buffers[4], *gate_up = buffers[5], *act = buffers[6], *parts = buffers[7];
  uint16_t* xb = (uint16_t*)buffers[8];
  for (int64_t l = 0; l < m->num_layers; ++l) {
    const Layer& L = m->layers[l];
    for (int64_t t : {L.wtype_qkv, L.wtype_o, L.wtype_gate_up, L.wtype_down}) {
      if (rs::with_wtype((int)t, [](auto) {}) != 0) return 2;  // a type the GEMM does not take
    }
  }
  // The prefill rows' attention tasks, numbered across the rows: row p's are
  // [task_start[p], task_start[p + 1]). Threads take them one at a time (a per-layer counter),
  // after their share of the single-query rows.
  std::vector<int64_t> task_start(num_prefills + 1, 0);
  for (int64_t p = 0; p < num_prefills; ++p) {
    const int64_t n = rs_prefill_attention_num_tasks(prefills[p].query_len, m->kv_heads);
    if (n < 1) return 2;  // a build without the prefill kernel
    task_start[p + 1] = task_start[p] + n;
  }
  std::vector<std::atomic<int64_t>> next_task(num_prefills > 0 ? m->num_layers : 0);
  for (auto& n : next_task) n.store(0, std::memory_order_relaxed);
  int64_t tasks = 0;  // attention tasks of all groups: (row, KV head) pairs
  for (int64_t g = 0; g < num_groups; ++g) tasks += (groups[g].end - groups[g].start) * m->kv_heads;
  // Where each thread's rows of attention start (rows[t], rows[nthreads] = all rows), split by
  // the keys the rows attend to rather than by their count: the step's rows come sorted by
  // context length, so an even count gave the second thread the long ones (batch32's decode
  // steps, 32 rows of 33-640 keys: 7.9 against 15.2 ms a step, the first thread waiting).
  // A row costs its keys plus a constant for its own setup.
  std::vector<int64_t> row_start(nthreads + 1, 0);
  {
    std::vector<int64_t> cost;
    cost.reserve(tokens);
    int64_t total = 0;
    for (int64_t g = 0; g < num_groups; ++g) {
      const Group& G = groups[g];
      const int64_t ctx = G.width * m->block_size;
      for (int64_t r = 0; r < G.end - G.start; ++r) {
        const int64_t n = rs_decode_row_keys(G.bias + r * ctx, ctx);
        cost.push_back(n + 16);
        total += n + 16;
      }
    }
    const int64_t rows = (int64_t)cost.size();
    int64_t r = 0, sum = 0;
    for (int t = 1; t < nthreads; ++t) {
      // the first row at which the running cost reaches t / nthreads of the total
      while (r < rows && (sum + cost[r]) * nthreads <= total * t) sum += cost[r++];
      if (r < rows && (sum + cost[r]) * nthreads - total * t < total * t - sum * nthreads) {
        sum += cost[r++];  // the row that crosses the mark goes to the side it is mostly on
      }
      row_start[t] = r;
    }
    row_start[nthreads] = rows;
  }
  SpinBarrier barrier(nthreads);
  std::atomic<int> failed{0};
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num(), nth = omp_get_num_threads();
    // Every thread of the team reaches every barrier. A team smaller than asked (nested,
    // thread limits) runs the step on its first thread alone, with no barrier.
    SpinBarrier* bar = nth == nthreads ? &barrier : nullptr;
    auto sync = [&] {
      if (bar != nullptr) bar->wait();
    };
    const bool works = bar != nullptr || t == 0;  // takes a share of the split ops
    const int my = bar != nullptr ? t : 0, all = bar != nullptr ? nth : 1;
    // y = x @ W.T for the thread's share of the output columns; in bf16 over xb, which the
    // op before rounded from x.
    auto gemm = [&](int64_t wtype, const uint8_t* w, int64_t n, int64_t k, const float* x,
                    float* y) {
      int64_t b, e;
      share(n, bf16 ? 32 : 16, my, all, b, e);  // bf16: whole panels, as rs_gemm_bf16's
      if (works && b < e &&
          (bf16 ? rs_gemm_bf16_cols_xb((int)wtype, w, n, k, xb, tokens, y, n, b, e)
                : rs_gemm_f32_cols((int)wtype, w, n, k, x, tokens, k, y, n, b, e))) {
        failed.store(1);
      }
      sync();
    };
    // A small op's rows [r0, r1): split between the threads when there is a row for each (a
    // row's result is the same whichever thread computes it), else all on the first thread.
    // On the first thread alone, 32-row decode steps spent 2.9-3.8 ms a step in them while
    // the other waited.
    int64_t own0 = 0, own1 = t == 0 ? tokens : 0;
    if (bar != nullptr && tokens >= nth) share(tokens, 1, t, nth, own0, own1);
    auto rows_op = [&](auto&& fn) {
      if (own0 < own1) fn(own0, own1);
      sync();
    };
    // Rows [r0, r1) of x [tokens, k] rounded into xb for a bf16 GEMM (the rows past tokens
    // zeroed by the thread with the last ones).
    auto round_rows = [&](const float* x, int64_t k, int64_t r0, int64_t r1) {
      if (!bf16) return;
      for (int64_t i = r0; i < r1; ++i) rs::fp32_to_bf16(x + i * k, k, xb + i * k);
      if (r1 == tokens) std::memset(xb + tokens * k, 0, (padded - tokens) * k * sizeof(uint16_t));
    };
    for (int64_t l = 0; l < m->num_layers; ++l) {
      const Layer& L = m->layers[l];
      // The layer's pools, as fp32 or as bf16 bits (m->kv_bf16); offsets are in elements.
      float* k_cache = (float*)kv + (2 * l) * pool;
      float* v_cache = k_cache + pool;
      uint16_t* k_cache16 = (uint16_t*)kv + (2 * l) * pool;
      uint16_t* v_cache16 = k_cache16 + pool;
      rows_op([&](int64_t r0, int64_t r1) {
        rs_add_rms_norm(h + r0 * hidden, l ? res + r0 * hidden : nullptr, L.input_norm,
                        normed + r0 * hidden, res + r0 * hidden, r1 - r0, hidden, m->eps, 1);
        round_rows(normed, hidden, r0, r1);
      });
      gemm(L.wtype_qkv, L.qkv, qkv_width, hidden, normed, qkv);
      rows_op([&](int64_t r0, int64_t r1) {
        rs_rope(qkv + r0 * qkv_width, r1 - r0, m->heads + m->kv_heads, hd, qkv_width,
                cos + r0 * (hd / 2), sin + r0 * (hd / 2), 1);
        for (int64_t i = r0; i < r1; ++i) {
          const float* row = qkv + i * qkv_width;
          if (m->kv_bf16) {  // rounded to nearest even, as torch's index_copy_ into bf16
            rs::fp32_to_bf16(row + q_width, kv_width, k_cache16 + slots[i] * kv_width);
            rs::fp32_to_bf16(row + q_width + kv_width, kv_width, v_cache16 + slots[i] * kv_width);
          } else {
            std::memcpy(k_cache + slots[i] * kv_width, row + q_width, kv_width * sizeof(float));
            std::memcpy(v_cache + slots[i] * kv_width, row + q_width + kv_width,
                        kv_width * sizeof(float));
          }
          std::memcpy(q + i * q_width, row, q_width * sizeof(float));
        }
      });
      if (row_parts > 0) {
        const Group& G = groups[0];
        for (int p = my; works && p < row_parts; p += all) {
          if (m->kv_bf16 ? rs_decode_row_part_bf16(q, k_cache16, v_cache16, G.block_ids, G.bias,
                                                   G.width, m->heads, m->kv_heads, hd,
                                                   m->block_size, m->scale, p, parts)
                         : rs_decode_row_part(q, k_cache, v_cache, G.block_ids, G.bias, G.width,
                                              m->heads, m->kv_heads, hd, m->block_size,
                                              m->scale, p, parts)) {
            failed.store(1);
          }
        }
        sync();
        int64_t h0, h1;
        share(m->heads, 1, my, all, h0, h1);
        if (works && h0 < h1) rs_decode_row_merge(parts, m->heads, hd, h0, h1, attn);
      } else if (works) {
        int64_t b, e;
        // Whole rows (attend_heads' tasks) where there are enough for every thread; fewer
        // rows than threads (a single stream) split their KV heads.
        if (tasks >= all * m->kv_heads) {
          b = (bar != nullptr ? row_start[my] : 0) * m->kv_heads;
          e = (bar != nullptr ? row_start[my + 1] : row_start[nthreads]) * m->kv_heads;
        } else {
          share(tasks, 1, my, all, b, e);
        }
        int64_t base = 0;  // the first task of group g
        for (int64_t g = 0; g < num_groups && base < e; ++g) {
          const Group& G = groups[g];
          const int64_t n = (G.end - G.start) * m->kv_heads;
          const int64_t lo = b > base ? b - base : 0, hi = e - base < n ? e - base : n;
          const float* qg = q + G.start * q_width;
          float* og = attn + G.start * q_width;
          const int64_t rows = G.end - G.start;
          if (lo < hi &&
              (m->kv_bf16
                   ? rs_paged_decode_attention_tasks_bf16(
                         qg, k_cache16, v_cache16, G.block_ids, G.bias, rows, G.width, m->heads,
                         m->kv_heads, hd, m->block_size, m->scale, og, lo, hi)
                   : rs_paged_decode_attention_tasks(
                         qg, k_cache, v_cache, G.block_ids, G.bias, rows, G.width, m->heads,
                         m->kv_heads, hd, m->block_size, m->scale, og, lo, hi))) {
            failed.store(1);
          }
          base += n;
        }
        // Then the prefill rows' tasks, one at a time from the layer's counter: the
        // longest first within a row, so the threads end on short ones together.
        if (num_prefills > 0) {
          const void* kc = m->kv_bf16 ? (const void*)k_cache16 : (const void*)k_cache;
          const void* vc = m->kv_bf16 ? (const void*)v_cache16 : (const void*)v_cache;
          int64_t p = 0;
          for (int64_t i = next_task[l].fetch_add(1); i < task_start[num_prefills];
               i = next_task[l].fetch_add(1)) {
            while (task_start[p + 1] <= i) ++p;  // the counter only grows: so does p
            const Prefill& P = prefills[p];
            const int64_t ti = i - task_start[p];
            if (rs_paged_prefill_attention_tasks(
                    q + P.start * q_width, q_width, kc, vc, (int)m->kv_bf16, P.block_ids,
                    P.num_computed, P.query_len, m->heads, m->kv_heads, hd, m->block_size,
                    m->scale, attn + P.start * q_width, ti, ti + 1)) {
              failed.store(1);
            }
          }
        }
      }
      sync();
      if (bf16) rows_op([&](int64_t r0, int64_t r1) { round_rows(attn, q_width, r0, r1); });
      gemm(L.wtype_o, L.o, hidden, q_width, attn, h);
      rows_op([&](int64_t r0, int64_t r1) {
        rs_add_rms_norm(h + r0 * hidden, res + r0 * hidden, L.post_norm, normed + r0 * hidden,
                        res + r0 * hidden, r1 - r0, hidden, m->eps, 1);
        round_rows(normed, hidden, r0, r1);
      });
      gemm(L.wtype_gate_up, L.gate_up, 2 * inter, hidden, normed, gate_up);
      rows_op([&](int64_t r0, int64_t r1) {
        rs_silu_and_mul(gate_up + r0 * 2 * inter, act + r0 * inter, r1 - r0, inter, 1);
        round_rows(act, inter, r0, r1);
      });
      gemm(L.wtype_down, L.down, hidden, inter, act, h);
    }
  }
  if (failed.load()) return 1;
  rs_add_rms_norm(h, res, m->final_norm, h, res, tokens, hidden, m->eps, nthreads);
  return 0;
}

}  // extern "C"
