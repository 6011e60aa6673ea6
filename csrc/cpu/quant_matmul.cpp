#include "cpu/quant_matmul.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/vectorize.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LLM_ENGINE_HAVE_AVX2_PATH 1
#else
#define LLM_ENGINE_HAVE_AVX2_PATH 0
#endif

namespace llm_engine {
namespace {

// Below this many multiply-adds a call runs on the calling thread alone.
[[maybe_unused]] constexpr int64_t kMinParallelWork = 1 << 16;
constexpr int64_t kQ = 32;    // values per block of Q8_0 / Q4_0 / Q4_1
constexpr int64_t kQK = 256;  // values per K-quant super-block

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

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (ggml's packing).
inline void k_scale_min(const uint8_t* q, int j, float* sc, float* mn) {
  if (j < 4) {
    *sc = static_cast<float>(q[j] & 63);
    *mn = static_cast<float>(q[j + 4] & 63);
  } else {
    *sc = static_cast<float>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *mn = static_cast<float>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// One block of `type` (block values) -> fp32.
void dequantize_block(QuantType type, const uint8_t* b, float* out) {
  switch (type) {
    case QuantType::kQ8_0: {
      const float d = fp16_to_fp32(b);
      for (int64_t i = 0; i < kQ; ++i) out[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
      return;
    }
    case QuantType::kQ4_0: {
      const float d = fp16_to_fp32(b);
      for (int64_t i = 0; i < 16; ++i) {
        out[i] = d * static_cast<float>((b[2 + i] & 0xF) - 8);
        out[i + 16] = d * static_cast<float>((b[2 + i] >> 4) - 8);
      }
      return;
    }
    case QuantType::kQ4_1: {
      const float d = fp16_to_fp32(b), m = fp16_to_fp32(b + 2);
      for (int64_t i = 0; i < 16; ++i) {
        out[i] = d * static_cast<float>(b[4 + i] & 0xF) + m;
        out[i + 16] = d * static_cast<float>(b[4 + i] >> 4) + m;
      }
      return;
    }
    case QuantType::kQ4_K:
    case QuantType::kQ5_K: {
      const bool five = type == QuantType::kQ5_K;
      const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
      const uint8_t* scales = b + 4;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = five ? b + 48 : b + 16;
      for (int j = 0; j < 8; ++j) {
        float sc, mn;
        k_scale_min(scales, j, &sc, &mn);
        const float dj = d * sc, mj = dmin * mn;
        const uint8_t* q = qs + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        for (int l = 0; l < 32; ++l) {
          int v = (q[l] >> shift) & 0xF;
          if (five) v |= ((qh[l] >> j) & 1) << 4;
          out[32 * j + l] = dj * static_cast<float>(v) - mj;
        }
      }
      return;
    }
    case QuantType::kQ6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
      const float d = fp16_to_fp32(b + 208);
      for (int p = 0; p < kQK; ++p) {
        const int half = p / 128, r = p % 128;
        const int lo = (ql[64 * half + r % 64] >> (4 * (r / 64))) & 0xF;
        const int hi = (qh[32 * half + r % 32] >> (2 * (r / 32))) & 3;
        out[p] = (d * static_cast<float>(scales[p / 16])) * static_cast<float>((lo | (hi << 4)) - 32);
      }
      return;
    }
  }
}

// ---------------------------------------------------------------- Q8_0 / Q4_0 / Q4_1
// Per weight block and x row: dw * sum_l q_l x_l, plus mw * sum_l x_l for Q4_1 (the
// block's offset times the x block's sum, `xsum`, computed once per call).
template <QuantType T>
constexpr int64_t block_bytes() {
  return T == QuantType::kQ8_0 ? 34 : T == QuantType::kQ4_0 ? 18 : 20;
}

// The integer levels of one block: Q8_0's int8 values, Q4_0's nibbles - 8, Q4_1's nibbles.
template <QuantType T>
inline void block_levels(const uint8_t* b, float* q) {
  if constexpr (T == QuantType::kQ8_0) {
    for (int64_t l = 0; l < kQ; ++l) q[l] = static_cast<float>(static_cast<int8_t>(b[2 + l]));
  } else {
    constexpr int bias = T == QuantType::kQ4_0 ? 8 : 0;
    const uint8_t* qs = b + (T == QuantType::kQ4_1 ? 4 : 2);
    for (int64_t l = 0; l < 16; ++l) {
      q[l] = static_cast<float>((qs[l] & 0xF) - bias);
      q[l + 16] = static_cast<float>((qs[l] >> 4) - bias);
    }
  }
}

// out[(i0 + r) * out_stride] for x rows i0 .. i0 + MR - 1 and the one weight row w.
template <QuantType T, int MR>
void rows_dot_generic(const uint8_t* w, int64_t nb, const float* x,
                                            const float* xsum, int64_t k, int64_t i0,
                                            float* out, int64_t out_stride) {
  float acc[MR] = {};
  float q[kQ];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * block_bytes<T>();
    const float dw = fp16_to_fp32(blk);
    block_levels<T>(blk, q);
    for (int r = 0; r < MR; ++r) {
      const float* xb = x + (i0 + r) * k + b * kQ;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t l = 0; l < kQ; ++l) s += q[l] * xb[l];
      acc[r] += dw * s;
      if constexpr (T == QuantType::kQ4_1) acc[r] += fp16_to_fp32(blk + 2) * xsum[(i0 + r) * nb + b];
    }
  }
  for (int r = 0; r < MR; ++r) out[(i0 + r) * out_stride] = acc[r];
}

#if LLM_ENGINE_HAVE_AVX2_PATH
__attribute__((target("f16c"))) inline float fp16_to_fp32_f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The same sums with the block's 32 levels expanded to four 8-float registers once and
// shared by the MR rows.
template <QuantType T, int MR>
__attribute__((target("avx2,fma,f16c"))) void rows_dot_avx2(const uint8_t* w, int64_t nb,
                                                            const float* x, const float* xsum,
                                                            int64_t k, int64_t i0, float* out,
                                                            int64_t out_stride) {
  __m256 acc[MR];
  float off_acc[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm256_setzero_ps();
    off_acc[r] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * block_bytes<T>();
    const __m256 dw = _mm256_set1_ps(fp16_to_fp32_f16c(blk));
    __m256 q[4];
    if constexpr (T == QuantType::kQ8_0) {
      for (int c = 0; c < 4; ++c) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * c));
        q[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
      }
    } else {
      const __m128i raw =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QuantType::kQ4_1 ? 4 : 2)));
      const __m128i low4 = _mm_set1_epi8(0x0F);
      __m128i lo = _mm_and_si128(raw, low4);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
      if constexpr (T == QuantType::kQ4_0) {
        lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
      }
      q[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
      q[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
      q[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
      q[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
    }
    for (int r = 0; r < MR; ++r) {
      const float* xb = x + (i0 + r) * k + b * kQ;
      __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
      s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), s);
      s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), s);
      s = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), s);
      acc[r] = _mm256_fmadd_ps(dw, s, acc[r]);
      if constexpr (T == QuantType::kQ4_1) {
        off_acc[r] += fp16_to_fp32_f16c(blk + 2) * xsum[(i0 + r) * nb + b];
      }
    }
  }
  for (int r = 0; r < MR; ++r) out[(i0 + r) * out_stride] = hsum(acc[r]) + off_acc[r];
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

template <QuantType T, int MR>
void rows_dot(const uint8_t* w, int64_t nb, const float* x, const float* xsum, int64_t k,
              int64_t i0, float* out, int64_t out_stride) {
#if LLM_ENGINE_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return rows_dot_avx2<T, MR>(w, nb, x, xsum, k, i0, out, out_stride);
#endif
  rows_dot_generic<T, MR>(w, nb, x, xsum, k, i0, out, out_stride);
}

constexpr int kRowTile = 4;  // x rows per pass over a weight row (each block expanded once)

template <QuantType T>
void matmul_blocks32(float* out, int64_t out_stride, const float* x, const uint8_t* w, int64_t m,
                     int64_t n, int64_t k, [[maybe_unused]] int num_threads) {
  const int64_t nb = k / kQ;
  std::vector<float> xsum;
  if constexpr (T == QuantType::kQ4_1) {
    xsum.resize(m * nb);
    for (int64_t i = 0; i < m * nb; ++i) {
      float s = 0.0f;
      for (int64_t l = 0; l < kQ; ++l) s += x[i * kQ + l];
      xsum[i] = s;
    }
  }
  const int64_t row_bytes = nb * block_bytes<T>();
#pragma omp parallel for if (m * n * k >= kMinParallelWork) num_threads(num_threads) \
    schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* wj = w + j * row_bytes;
    float* oj = out + j;
    int64_t i = 0;
    for (; i + kRowTile <= m; i += kRowTile) {
      rows_dot<T, kRowTile>(wj, nb, x, xsum.data(), k, i, oj, out_stride);
    }
    switch (m - i) {
      case 3: rows_dot<T, 3>(wj, nb, x, xsum.data(), k, i, oj, out_stride); break;
      case 2: rows_dot<T, 2>(wj, nb, x, xsum.data(), k, i, oj, out_stride); break;
      case 1: rows_dot<T, 1>(wj, nb, x, xsum.data(), k, i, oj, out_stride); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------- K-quants
LLM_ENGINE_ISA_CLONES
float dot_fp32(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void matmul_kquant(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                   QuantType type, int64_t m, int64_t n, int64_t k,
                   [[maybe_unused]] int num_threads) {
  const int64_t nb = k / kQK;
  const int64_t bytes = quant_format(type).bytes;
#pragma omp parallel num_threads(num_threads) if (m * n * k >= kMinParallelWork)
  {
    alignas(64) float values[kQK];
    std::vector<float> acc(m);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < n; ++j) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t b = 0; b < nb; ++b) {
        dequantize_block(type, w + (j * nb + b) * bytes, values);
        for (int64_t i = 0; i < m; ++i) acc[i] += dot_fp32(values, x + i * k + b * kQK, kQK);
      }
      for (int64_t i = 0; i < m; ++i) out[i * out_stride + j] = acc[i];
    }
  }
}

}  // namespace

QuantType quant_type_from_name(const std::string& name) {
  static const char* const kNames[] = {"q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"};
  for (int i = 0; i < 6; ++i) {
    if (name == kNames[i]) return static_cast<QuantType>(i);
  }
  throw std::invalid_argument("qtype must be one of q8_0, q4_0, q4_1, q4_k, q5_k, q6_k, got '" +
                              name + "'");
}

QuantFormat quant_format(QuantType type) {
  switch (type) {
    case QuantType::kQ8_0: return {kQ, 34};
    case QuantType::kQ4_0: return {kQ, 18};
    case QuantType::kQ4_1: return {kQ, 20};
    case QuantType::kQ4_K: return {kQK, 144};
    case QuantType::kQ5_K: return {kQK, 176};
    case QuantType::kQ6_K: return {kQK, 210};
  }
  throw std::invalid_argument("unknown quantization type");
}

void quant_dequantize(float* out, const uint8_t* blocks, QuantType type, int64_t rows, int64_t k,
                      [[maybe_unused]] int num_threads) {
  const QuantFormat f = quant_format(type);
  const int64_t nb = k / f.block;
#pragma omp parallel for if (rows * k >= kMinParallelWork) num_threads(num_threads) \
    schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      dequantize_block(type, blocks + (r * nb + b) * f.bytes, out + r * k + b * f.block);
    }
  }
}

void quant_matmul(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                  QuantType type, int64_t m, int64_t n, int64_t k, int num_threads) {
  if (m == 0 || n == 0) return;
  switch (type) {
    case QuantType::kQ8_0:
      return matmul_blocks32<QuantType::kQ8_0>(out, out_stride, x, w, m, n, k, num_threads);
    case QuantType::kQ4_0:
      return matmul_blocks32<QuantType::kQ4_0>(out, out_stride, x, w, m, n, k, num_threads);
    case QuantType::kQ4_1:
      return matmul_blocks32<QuantType::kQ4_1>(out, out_stride, x, w, m, n, k, num_threads);
    default:
      return matmul_kquant(out, out_stride, x, w, type, m, n, k, num_threads);
  }
}

}  // namespace llm_engine
