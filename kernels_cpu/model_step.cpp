// A Llama model's decoder layers for one step in one call: the quantized path's decode steps.
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
// row one query token: decode rows, and the short rows torch_paged.py splits per token); a
// step with a longer prefill row stays on the Python path.
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" {
int rs_gemm_f32(int wtype, const uint8_t* w, int64_t n, int64_t k, const float* x, int64_t m,
                int64_t ldx, float* y, int64_t ldy, int nthreads);
void rs_add_rms_norm(const float* x, const float* residual, const float* weight, float* out,
                     float* residual_out, int64_t rows, int64_t h, float eps, int nthreads);
void rs_rope(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t ldx,
             const float* cos, const float* sin, int nthreads);
void rs_silu_and_mul(const float* x, float* out, int64_t tokens, int64_t n, int nthreads);
int rs_paged_decode_attention(const float* q, const float* k_cache, const float* v_cache,
                              const int64_t* block_ids, const float* bias, int64_t rows,
                              int64_t width, int64_t heads, int64_t kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, float* out, int nthreads);
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
};

// Consecutive single-query rows attended together (torch_paged.py's DecodeGroup).
struct Group {
  int64_t start, end, width;  // rows [start, end); block table width in blocks
  const int64_t* block_ids;   // [(end - start) * width]
  const float* bias;          // [(end - start), width * block_size]
};

}  // namespace

extern "C" {

// h [tokens, hidden]: the step's embeddings in, the final norm's output out (in place).
// kv: [layers, 2, blocks, block_size, kv_heads, head_dim] fp32; slots [tokens]; cos/sin
// [tokens, head_dim / 2]; groups cover every token. 0 on success, else the failing kernel's
// code (negative: a bad argument).
int rs_llama_layers(const Model* m, float* h, int64_t tokens, float* kv, int64_t kv_blocks,
                    const int64_t* slots, const float* cos, const float* sin, const Group* groups,
                    int64_t num_groups, int nthreads) {
  if (tokens < 1 || m->heads % m->kv_heads) return -1;
  const int64_t hd = m->head_dim, hidden = m->hidden, inter = m->intermediate;
  const int64_t q_width = m->heads * hd, kv_width = m->kv_heads * hd;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const int64_t pool = kv_blocks * m->block_size * kv_width;  // floats of one K or V pool
  static thread_local std::vector<float> scratch;
  const int64_t need = tokens * (2 * hidden + qkv_width + 2 * q_width + 2 * inter + inter);
  if ((int64_t)scratch.size() < need) scratch.resize(need);
  float* res = scratch.data();
  float* normed = res + tokens * hidden;
  float* qkv = normed + tokens * hidden;
  float* q = qkv + tokens * qkv_width;
  float* attn = q + tokens * q_width;
  float* gate_up = attn + tokens * q_width;
  float* act = gate_up + tokens * 2 * inter;
  int rc = 0;
  for (int64_t l = 0; l < m->num_layers; ++l) {
    const Layer& L = m->layers[l];
    float* k_cache = kv + (2 * l) * pool;
    float* v_cache = k_cache + pool;
    rs_add_rms_norm(h, l ? res : nullptr, L.input_norm, normed, res, tokens, hidden, m->eps,
                    nthreads);
    if ((rc = rs_gemm_f32((int)L.wtype_qkv, L.qkv, qkv_width, hidden, normed, tokens, hidden, qkv,
                          qkv_width, nthreads)))
      return rc;
    rs_rope(qkv, tokens, m->heads + m->kv_heads, hd, qkv_width, cos, sin, nthreads);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* row = qkv + t * qkv_width;
      std::memcpy(k_cache + slots[t] * kv_width, row + q_width, kv_width * sizeof(float));
      std::memcpy(v_cache + slots[t] * kv_width, row + q_width + kv_width, kv_width * sizeof(float));
      std::memcpy(q + t * q_width, row, q_width * sizeof(float));
    }
    for (int64_t g = 0; g < num_groups; ++g) {
      const Group& G = groups[g];
      if ((rc = rs_paged_decode_attention(q + G.start * q_width, k_cache, v_cache, G.block_ids,
                                          G.bias, G.end - G.start, G.width, m->heads, m->kv_heads,
                                          hd, m->block_size, m->scale, attn + G.start * q_width,
                                          nthreads)))
        return rc;
    }
    if ((rc = rs_gemm_f32((int)L.wtype_o, L.o, hidden, q_width, attn, tokens, q_width, h, hidden,
                          nthreads)))
      return rc;
    rs_add_rms_norm(h, res, L.post_norm, normed, res, tokens, hidden, m->eps, nthreads);
    if ((rc = rs_gemm_f32((int)L.wtype_gate_up, L.gate_up, 2 * inter, hidden, normed, tokens, hidden,
                          gate_up, 2 * inter, nthreads)))
      return rc;
    rs_silu_and_mul(gate_up, act, tokens, inter, nthreads);
    if ((rc = rs_gemm_f32((int)L.wtype_down, L.down, hidden, inter, act, tokens, inter, h, hidden,
                          nthreads)))
      return rc;
  }
  rs_add_rms_norm(h, res, m->final_norm, h, res, tokens, hidden, m->eps, nthreads);
  return 0;
}

}  // extern "C"
