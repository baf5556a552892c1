// Host stand-in for CUDA's cuda_fp16.h, for the kernel emulator: __half with fp32 conversions.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
typedef __half half;

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline __half __float2half(float x) { return __float2half_rn(x); }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
