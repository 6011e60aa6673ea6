// What the CPU kernels share so that their loops vectorise: one build of a function per
// x86 vector ISA, float helpers written for the vectoriser, and the check for the kernels
// written with AVX2 intrinsics.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

// Kernels written with AVX2 intrinsics are built where GCC-style target attributes and
// the x86 intrinsics exist, and taken when cpu_has_avx2() says the CPU runs them.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LLM_ENGINE_HAVE_AVX2_PATH 1
#else
#define LLM_ENGINE_HAVE_AVX2_PATH 0
#endif

// LLM_ENGINE_ISA_CLONES before a function compiles it for AVX-512, AVX2 and baseline
// x86-64, the best one picked when the library loads (GCC's target_clones, an ifunc:
// x86-64 Linux). Other compilers and targets (clang, macOS, ARM) build it once for the
// compiler's own target.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define LLM_ENGINE_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LLM_ENGINE_ISA_CLONES
#endif

namespace llm_engine {

#if LLM_ENGINE_HAVE_AVX2_PATH
// Whether this CPU has AVX2, FMA and F16C (every x86-64 CPU since 2013-2015 but a few).
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

template <typename To, typename From>
inline To bit_cast(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// exp(x) for x <= 0, within 2 ulp: x = n*ln2 + r with |r| <= ln2/2, exp(r) by its
// degree-6 Taylor polynomial, 2^n from the exponent bits. Inputs below -87 are clamped
// there: exp(-87) ~ 1.6e-38, nothing next to the 1 it is added to or compared with by
// the callers (softmax numerators next to the row maximum's exp(0) = 1; 1 + exp(-|x|)
// in the sigmoid), and 2^n stays a normal float.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504f;
  constexpr float kLn2Hi = 0.693145752f;  // ln 2 split in two (Cody-Waite)
  constexpr float kLn2Lo = 1.42860677e-6f;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = std::max(x, -87.0f);
  const float t = x * kLog2e + kShifter;
  const float n = t - kShifter;
  const int32_t ni = bit_cast<int32_t>(t) - bit_cast<int32_t>(kShifter);
  const float r = x - n * kLn2Hi - n * kLn2Lo;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bit_cast<float>((ni + 127) << 23);
}

}  // namespace llm_engine
