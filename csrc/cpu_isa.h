// Which vector instruction sets this CPU has, asked once at run time, and the vector exp that
// both kernels share. The extension is built for the x86-64 baseline (no -march=native: a build
// copied to an older CPU must not die with an illegal instruction); the AVX2 and AVX-512 code
// is compiled for its own target (GCC's target pragma) and chosen here when the CPU has it.
// MALT_FAST_NATIVE=1 at build time adds -march=native for the generic code too (setup.py).
// MALT_FAST_ISA=plain|avx2|avx512 at run time caps the choice (tests run every path on one
// machine); avx512 keeps the AVX-512 row ops but turns the AVX512-BF16 GEMMs off.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define MALT_X86 1
#endif

namespace malt_isa {

// 0: plain loops, 1: up to AVX2 + FMA, 2: up to AVX-512 (fp32), 3: AVX-512 with bf16 dot products
inline int cap() {
  static const int level = [] {
    const char* v = std::getenv("MALT_FAST_ISA");
    if (v != nullptr && std::strcmp(v, "plain") == 0) return 0;
    if (v != nullptr && std::strcmp(v, "avx2") == 0) return 1;
    if (v != nullptr && std::strcmp(v, "avx512") == 0) return 2;
    return 3;
  }();
  return level;
}

inline bool avx2_fma() {
#ifdef MALT_X86
  static const bool yes =
      cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

inline bool avx512f() {
#ifdef MALT_X86
  static const bool yes = cap() >= 2 && __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

// vdpbf16ps (bf16 pair dot products into fp32). Asked through CPUID leaf 7 subleaf 1, EAX bit 5,
// rather than __builtin_cpu_supports: older GCCs do not know the feature's name. avx512f() above
// already says the OS saves the zmm state.
inline bool avx512_bf16() {
#ifdef MALT_X86
  static const bool yes = [] {
    if (cap() < 3 || !avx512f() || !__builtin_cpu_supports("avx512bw")) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return ((a >> 5) & 1u) != 0;
  }();
  return yes;
#else
  return false;
#endif
}

// the widest vector path the kernels take here (the bf16 GEMMs are a separate switch: avx512_bf16)
inline const char* name() { return avx512f() ? "avx512" : avx2_fma() ? "avx2" : "plain"; }

#ifdef MALT_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// exp(x) for x <= 0 (scores minus a max, old max minus new max): Cephes expf, range reduction
// x = k ln2 + r, degree-6 polynomial in r, times 2^k. Below -87.3 (incl. -inf) it returns 0.
inline __m256 exp_nonpos8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // NaN stays NaN (max_ps returns its second operand then)
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}
#pragma GCC pop_options
#endif

}  // namespace malt_isa
