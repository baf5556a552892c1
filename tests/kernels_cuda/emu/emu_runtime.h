// A CPU emulator for ringserve's CUDA kernels, force-included ahead of a .cu source that
// g++ then compiles as C++. Each CUDA thread of a block is a fiber (ucontext); blocks run one
// after another. __syncthreads and the warp collectives (__shfl_*_sync, __syncwarp) are
// barriers between fibers, and the emulator reports, instead of hanging, the misuse a GPU
// would punish: a barrier some threads never reach, a full-mask shuffle with lanes gone.
// Static __shared__ variables become function statics (one block runs at a time); dynamic
// shared memory starts as 0xff bytes (NaN as floats) so reads of unwritten entries show, and
// a guard zone after it catches writes past the launch's size.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define RS_DYNAMIC_SMEM(name) unsigned char* name = emu::g.smem.data()

namespace emu {

enum State { READY, AT_SYNC, AT_WARP, DONE };
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

struct Thread {
  ucontext_t ctx;
  uint3 tid;
  State state;
};

struct Launch {
  std::vector<Thread> threads;
  std::vector<char> stacks;
  std::vector<unsigned char> smem;
  std::vector<uint64_t> shuffle_slots;
  size_t smem_bytes = 0;
  ucontext_t scheduler;
  int current = -1;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  char error[512] = {0};
};
inline Launch g;

inline Thread& me() { return g.threads[g.current]; }
inline int linear_tid() { return static_cast<int>(&me() - g.threads.data()); }

// Records an error and parks the calling fiber for good; the launch then returns it.
inline void fail(const char* what) {
  if (!g.error[0]) {
    std::snprintf(g.error, sizeof(g.error), "%s (block %u,%u,%u thread %d)", what,
                  g.block_idx.x, g.block_idx.y, g.block_idx.z, linear_tid());
  }
  me().state = DONE;
  swapcontext(&me().ctx, &g.scheduler);
}

inline void wait(State s) {
  me().state = s;
  swapcontext(&me().ctx, &g.scheduler);
}

inline void fiber_entry() {
  (*g.body)();
  me().state = DONE;
  swapcontext(&me().ctx, &g.scheduler);
}

// Runs every fiber until all are done; releases barriers once all their threads arrive.
inline bool run_block() {
  const int n = static_cast<int>(g.threads.size());
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (g.threads[i].state != READY) continue;
      g.current = i;
      swapcontext(&g.scheduler, &g.threads[i].ctx);
      if (g.error[0]) return false;
    }
    bool released = false;
    int done = 0, at_sync = 0;
    for (int w = 0; w * 32 < n; ++w) {
      int lanes_done = 0, lanes_warp = 0, lanes_other = 0;
      const int end = std::min(n, (w + 1) * 32);
      for (int i = w * 32; i < end; ++i) {
        const State s = g.threads[i].state;
        lanes_done += s == DONE;
        lanes_warp += s == AT_WARP;
        lanes_other += s == AT_SYNC;
      }
      done += lanes_done;
      at_sync += lanes_other;
      if (lanes_warp == 0) continue;
      if (lanes_done || lanes_other) {
        std::snprintf(g.error, sizeof(g.error),
                      "warp %d of block %u,%u,%u: %d lanes at a warp collective while %d exited "
                      "and %d wait at __syncthreads", w, g.block_idx.x, g.block_idx.y,
                      g.block_idx.z, lanes_warp, lanes_done, lanes_other);
        return false;
      }
      for (int i = w * 32; i < end; ++i) g.threads[i].state = READY;
      released = true;
    }
    if (done == n) return true;
    if (released) continue;
    if (at_sync + done == n) {
      if (done) {
        std::snprintf(g.error, sizeof(g.error),
                      "block %u,%u,%u: __syncthreads reached by %d threads while %d exited",
                      g.block_idx.x, g.block_idx.y, g.block_idx.z, at_sync, done);
        return false;
      }
      for (auto& t : g.threads) t.state = READY;
      continue;
    }
    std::snprintf(g.error, sizeof(g.error), "block %u,%u,%u: deadlock", g.block_idx.x,
                  g.block_idx.y, g.block_idx.z);
    return false;
  }
}

inline int launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body,
                  char* error, size_t error_len) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  g.error[0] = 0;
  g.body = &body;
  g.grid_dim = grid;
  g.block_dim = block;
  g.threads.assign(n, Thread{});
  g.stacks.resize(static_cast<size_t>(n) * kStackBytes);
  g.shuffle_slots.assign(n, 0);
  g.smem_bytes = smem_bytes;
  g.smem.assign(smem_bytes + kGuardBytes, 0xff);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g.block_idx = {bx, by, bz};
        std::fill(g.smem.begin(), g.smem.end(), 0xff);
        for (int i = 0; i < n; ++i) {
          Thread& t = g.threads[i];
          t.tid = {static_cast<unsigned>(i % block.x),
                   static_cast<unsigned>(i / block.x % block.y),
                   static_cast<unsigned>(i / (block.x * block.y))};
          t.state = READY;
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = g.stacks.data() + static_cast<size_t>(i) * kStackBytes;
          t.ctx.uc_stack.ss_size = kStackBytes;
          t.ctx.uc_link = nullptr;
          makecontext(&t.ctx, fiber_entry, 0);
        }
        const bool ok = run_block();
        for (size_t i = smem_bytes; ok && i < g.smem.size(); ++i) {
          if (g.smem[i] != 0xff) {
            std::snprintf(g.error, sizeof(g.error),
                          "block %u,%u,%u wrote dynamic shared memory byte %zu past the %zu "
                          "launched", bx, by, bz, i, smem_bytes);
            break;
          }
        }
        if (!ok || g.error[0]) {
          std::snprintf(error, error_len, "%s", g.error);
          return 1;
        }
      }
  return 0;
}

inline void warp_barrier() { wait(AT_WARP); }

template <typename T>
T shuffle(unsigned mask, T v, int src_lane, const char* what) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  if (mask != 0xffffffffu) fail("emulator supports full-mask warp collectives only");
  const int tid = linear_tid();
  if (g.threads.size() % 32) fail("warp collective in a block that is not whole warps");
  std::memcpy(&g.shuffle_slots[tid], &v, sizeof(T));
  warp_barrier();
  T r;
  std::memcpy(&r, &g.shuffle_slots[(tid & ~31) | (src_lane & 31)], sizeof(T));
  warp_barrier();  // nobody overwrites a slot before every lane has read it
  (void)what;
  return r;
}

template <typename... A, size_t... I>
void invoke(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
void invoke(void (*f)(A...), void** args) {
  invoke(f, args, std::index_sequence_for<A...>{});
}

}  // namespace emu

#define threadIdx (emu::me().tid)
#define blockIdx (emu::g.block_idx)
#define blockDim (emu::g.block_dim)
#define gridDim (emu::g.grid_dim)

inline void __syncthreads() { emu::wait(emu::AT_SYNC); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("emulator supports full-mask __syncwarp only");
  emu::warp_barrier();
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = emu::linear_tid() & 31;
  return emu::shuffle(mask, v, (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1)), "xor");
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = emu::linear_tid() & 31;
  return emu::shuffle(mask, v, (lane & ~(width - 1)) | (src & (width - 1)), "idx");
}

// mma.sync.m16n8k16 with fp32 accumulators, as a warp collective: every lane publishes its
// fragments, then computes its own 4 outputs from the owners of each A and B element, with
// the PTX ISA's fragment layout (see mma_16816 in common.cuh).
#define RS_EMULATED_MMA
#include "cuda_bf16.h"
#include "cuda_fp16.h"
namespace emu {
struct MmaFragments {
  unsigned a[4], b[2];
};
inline float mma_element(unsigned reg, int half) {
  const unsigned short bits = static_cast<unsigned short>(reg >> (16 * half));
#if defined(RS_DTYPE_BF16)
  return __bfloat162float(__nv_bfloat16{bits});
#else
  return __half2float(__half{bits});
#endif
}
}  // namespace emu

inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  static std::vector<emu::MmaFragments> frags;
  const int tid = emu::linear_tid();
  if (emu::g.threads.size() % 32) emu::fail("mma in a block that is not whole warps");
  frags.resize(emu::g.threads.size());
  frags[tid] = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  emu::warp_barrier();
  const int base = tid & ~31, lane = tid & 31, g = lane >> 2, t = lane & 3;
  auto A = [&](int row, int col) {
    const int owner = (row % 8) * 4 + (col % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    return emu::mma_element(frags[base + owner].a[reg], col & 1);
  };
  auto B = [&](int k, int n) {
    const int owner = n * 4 + (k % 8) / 2;
    return emu::mma_element(frags[base + owner].b[k >= 8 ? 1 : 0], k & 1);
  };
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  emu::warp_barrier();  // nobody overwrites fragments before every lane has read them
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
using std::max;
using std::min;
