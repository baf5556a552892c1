// Helpers shared by ringserve's kernels: the storage type, 16-byte vectors, reductions.
//
// Each .cu file is compiled once per storage type: -DRS_DTYPE_BF16 or -DRS_DTYPE_F16.
// All arithmetic is fp32; values are rounded to the storage type only when stored.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if defined(RS_DTYPE_BF16)
typedef __nv_bfloat16 scalar_t;
#elif defined(RS_DTYPE_F16)
typedef __half scalar_t;
#else
#error "compile with -DRS_DTYPE_BF16 or -DRS_DTYPE_F16"
#endif

// Declares the block's dynamic shared memory (a host emulator of these kernels redefines it).
#ifndef RS_DYNAMIC_SMEM
#define RS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#define RS_FULL_MASK 0xffffffffu
// NVRTC has no <math.h>, hence no INFINITY.
#define RS_INF __int_as_float(0x7f800000)

// scalar_t elements in one 16-byte access.
constexpr int VEC = 8;

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Loads VEC consecutive elements (one 16-byte aligned access) as floats.
__device__ __forceinline__ void load_vec(const scalar_t* p, float (&out)[VEC]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
}

// Stores VEC floats rounded to scalar_t with one 16-byte aligned access.
__device__ __forceinline__ void store_vec(scalar_t* p, const float (&in)[VEC]) {
  uint4 raw;
  scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) e[i] = from_float<scalar_t>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ void zero_vec(float (&v)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = 0.f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(RS_FULL_MASK, v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(RS_FULL_MASK, v, m));
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32;
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // a previous reduction may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.f);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : -RS_INF);
}

// Raw bits of a storage value, for packing pairs into the 32-bit registers of mma.sync.
__device__ __forceinline__ unsigned short to_bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ unsigned short to_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two values rounded to scalar_t in one register, the first in the low half (mma's order).
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  return static_cast<unsigned>(to_bits(from_float<scalar_t>(lo))) |
         (static_cast<unsigned>(to_bits(from_float<scalar_t>(hi))) << 16);
}

// d += a * b on the tensor cores for one warp: a 16x16 (row-major) by b 16x8 (column-major),
// fp32 accumulators. Fragment layouts are the PTX ISA's for mma.m16n8k16 (g = lane / 4,
// t = lane % 4): a = {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..2t+9), (g+8, 2t+8..)};
// b = {(k 2t..2t+1, n g), (k 2t+8..2t+9, n g)}; d = {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
#ifndef RS_EMULATED_MMA
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4],
                                          const unsigned (&b)[2]) {
#if defined(RS_DTYPE_BF16)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif
