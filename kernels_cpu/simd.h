// Helpers shared by the kernels: cache-line-aligned buffers; with AVX2 a horizontal sum and an
// 8-lane exp (with AVX-512 a 16-lane one).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace rs {

// Buffers the kernels read 64 bytes at a time start on a cache line. std::vector promises
// 16 bytes only, and a 64-byte load across two lines is split in two: rs_gemm_f32 over
// 180,000 Q4_1 rows of 576 with its rows of x 16 bytes past a line took 11.0 ms for 6 rows
// and 14.8 ms for 8, against 8.1 and 10.7 ms aligned (2 threads). The engine's buffers
// happened to start on a line in the runs measured; this makes it so for every size.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// n rounded up to whole cache lines of T (buffers carved from one allocation stay aligned).
template <class T>
constexpr std::ptrdiff_t whole_lines(std::ptrdiff_t n) {
  constexpr std::ptrdiff_t per = 64 / sizeof(T);
  return (n + per - 1) / per * per;
}

// The constants of exp8 and exp16: x clamped to [kLo, kHi], x = n ln2 + r with ln2 split in
// a high and a low part, and exp(r) = 1 + r + r^2 (kPoly[0] r^5 + ... + kPoly[5]) (Cephes'
// expf coefficients: ~1 ulp).
struct ExpConstants {
  static constexpr float kLo = -87.3f, kHi = 88.3f, kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                     4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};

#if defined(__AVX2__)
// exp(x) for 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for exp(r), times
// 2^n built in the exponent bits (ExpConstants).
inline __m256 exp8(__m256 x) {
  using C = ExpConstants;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(C::kLo)), _mm256_set1_ps(C::kHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(C::kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C::kLn2Lo), r);
  __m256 p = _mm256_set1_ps(C::kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C::kPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512F__)
// exp(x) for 16 lanes (exp8, 16 wide); -inf gives 0.
inline __m512 exp16(__m512 x) {
  using C = ExpConstants;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(C::kLo)), _mm512_set1_ps(C::kHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(C::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(C::kLn2Lo), r);
  __m512 p = _mm512_set1_ps(C::kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C::kPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

}  // namespace rs
