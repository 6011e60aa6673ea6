// What the quantized-weight kernels share (quant_matmul.cpp, quant_rows8.cpp): the sizes of
// the 32-value block types, fp16 scales, the int8 rounding of activations, and which
// instruction set the kernels take.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/quant_matmul.h"
#include "cpu/vectorize.h"

namespace llm_engine {
namespace quant_internal {

// Below this many multiply-adds a call runs on the calling thread alone.
[[maybe_unused]] constexpr int64_t kMinParallelWork = 1 << 16;
constexpr int64_t kQ = 32;  // values per block of Q8_0 / Q4_0 / Q4_1

// Whether blocks of this type hold 32 values (Q8_0, Q4_0, Q4_1): the types the int8 and
// rows8 kernels take.
inline bool is_block32(QuantType type) {
  return type == QuantType::kQ8_0 || type == QuantType::kQ4_0 || type == QuantType::kQ4_1;
}

template <QuantType T>
constexpr int64_t block_bytes() {
  return T == QuantType::kQ8_0 ? 34 : T == QuantType::kQ4_0 ? 18 : 20;
}

inline float fp16_to_fp32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  if (exp == 31) return bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  return bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

// One block of `type` (its block size of values) -> fp32.
void dequantize_block(QuantType type, const uint8_t* b, float* out);

// One block of 32 values rounded to int8 as llama.cpp does: scale d = max|x| / 127, q =
// round(x / d) to nearest, ties away from zero, sum = sum(q). A block with a NaN or an
// infinity gets d NaN (so the rows it feeds come out NaN) and levels 0.
void quantize_block32(const float* x, int8_t* q, float* d, int32_t* sum);

// The kRows8 versions of the public functions (quant_rows8.cpp), for Q8_0 / Q4_0 / Q4_1;
// they hand any last n % 8 rows to the kRows ones.
void dequantize_rows8(float* out, const uint8_t* blocks, QuantType type, int64_t rows,
                      int64_t k, int num_threads);
void matmul_rows8(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                  QuantType type, int64_t m, int64_t n, int64_t k, int num_threads, bool int8);

#if LLM_ENGINE_HAVE_AVX2_PATH
__attribute__((target("f16c"))) inline float fp16_to_fp32_f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}
#endif

// Whether the kernels whose AVX2 and plain C++ paths agree bit for bit take the AVX2 one:
// the CPU has AVX2, FMA and F16C, and LLM_ENGINE_QUANT_GENERIC was not set in the
// environment before the first call (tests set it to run the plain one).
inline bool int8_use_avx2() {
#if LLM_ENGINE_HAVE_AVX2_PATH
  static const bool use = cpu_has_avx2() && std::getenv("LLM_ENGINE_QUANT_GENERIC") == nullptr;
  return use;
#else
  return false;
#endif
}

}  // namespace quant_internal
}  // namespace llm_engine
