#include "cpu/quant_matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "cpu/quant_blocks.h"
#include "cpu/vectorize.h"

namespace llm_engine {
namespace {

using namespace quant_internal;

constexpr int64_t kQK = 256;  // values per K-quant super-block

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

}  // namespace

void quant_internal::dequantize_block(QuantType type, const uint8_t* b, float* out) {
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

namespace {

// ---------------------------------------------------------------- Q8_0 / Q4_0 / Q4_1
// Per weight block and x row: dw * sum_l q_l x_l, plus mw * sum_l x_l for Q4_1 (the
// block's offset times the x block's sum, `xsum`, computed once per call).
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

// ---------------------------------------------------------------- int8 activations
// llama.cpp's scheme: each x row is rounded to int8 per 32-value block (scale d = max|x| /
// 127, q = round(x / d), ties away from zero), then every weight block takes an integer
// dot product with it (exact in int32). Per (x row, weight row) the blocks are spread
// over 8 float lanes (block_lane): lane = fma(dw * dx, dot, lane), then for Q4_1
// lane = fma(mw, sx, lane) with sx = dx * sum(q) of the x block (the weight offset's
// term). The 8 lanes are added at the end in a fixed tree. The AVX2 path reduces 8
// blocks' integer dot products to one vector and takes those fmas 8 blocks at a time, the
// plain C++ path one block at a time: the same operations per lane, so they agree bit
// for bit.
//
// For the 4-bit types x's levels are stored so that a 256-bit register of nibbles lines
// up with them: blocks 2p and 2p + 1 as [2p: 0-15 | 2p+1: 0-15 | 2p: 16-31 | 2p+1: 16-31]
// (a last odd block with zeros for its partner). Q4_0's -8 is folded in as -8 * sum(q)
// per block.
constexpr int kLanes = 8;

template <QuantType T>
constexpr bool nibbles() {
  return T != QuantType::kQ8_0;
}

// x (m, k) rounded per block: q (m, row) in the layout above (row_levels), d (m, k / 32),
// s = d * sum(q) (Q4_1), sum = sum(q) (Q4_0).
struct Int8Rows {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<float> s;
  std::vector<int32_t> sum;
};

// Levels per row of Int8Rows::q for nb blocks.
template <QuantType T>
constexpr int64_t row_levels(int64_t nb) {
  return (nibbles<T>() ? (nb + 1) / 2 * 2 : nb) * kQ;
}

// The lane of block b: within each group of 8 blocks, Q8_0 blocks in order, the 4-bit
// types' even blocks in lanes 0-3 and odd ones in 4-7 (the order the AVX2 path's
// reduction leaves them in).
template <QuantType T>
inline int block_lane(int64_t b) {
  const int p = static_cast<int>(b % kLanes);
  return nibbles<T>() ? (p % 2) * 4 + p / 2 : p;
}

// Where value e of x block b is in its row of Int8Rows::q.
template <QuantType T>
inline int64_t level_at(int64_t b, int64_t e) {
  if (!nibbles<T>()) return b * kQ + e;
  return (b / 2) * 2 * kQ + (e / 16) * kQ + (b % 2) * 16 + e % 16;
}

// One block of 32 values: scale and sum of its levels. A block with a NaN or an infinity
// gets scale NaN (so the rows it feeds come out NaN) and levels 0.
void quantize_block32_generic(const float* x, int8_t* q, float* d_out, int32_t* sum) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t l = 0; l < kQ; ++l) {
    const float a = std::fabs(x[l]);
    finite = finite && a <= std::numeric_limits<float>::max();
    amax = std::max(amax, a);
  }
  if (!finite) {
    std::memset(q, 0, kQ);
    *d_out = std::numeric_limits<float>::quiet_NaN();
    *sum = 0;
    return;
  }
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int32_t s = 0;
  for (int64_t l = 0; l < kQ; ++l) {
    const int32_t v = static_cast<int32_t>(std::round(x[l] * id));  // |v| <= 127
    q[l] = static_cast<int8_t>(v);
    s += v;
  }
  *d_out = d;
  *sum = s;
}

// The fixed order in which the 8 lanes are added.
inline float lanes_sum(const float* v) {
  const float a0 = v[0] + v[4], a1 = v[1] + v[5], a2 = v[2] + v[6], a3 = v[3] + v[7];
  return (a0 + a2) + (a1 + a3);
}

// Block b's terms into its lane (both paths use this for the blocks they take singly).
template <QuantType T>
inline void add_block(float* lanes, int lane, const uint8_t* blk, int32_t dot, float dw,
                      float xd, float xs) {
  lanes[lane] = std::fma(dw * xd, static_cast<float>(dot), lanes[lane]);
  if constexpr (T == QuantType::kQ4_1) {
    lanes[lane] = std::fma(fp16_to_fp32(blk + 2), xs, lanes[lane]);
  }
}

// out[(i0 + r) * out_stride] for x rows i0 .. i0 + MR - 1 and the weight row wj.
template <QuantType T, int MR>
void int8_dot_generic(const uint8_t* wj, int64_t nb, const Int8Rows& a, int64_t i0, float* out,
                      int64_t out_stride) {
  float lanes[MR][kLanes] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wj + b * block_bytes<T>();
    int32_t w[kQ];
    if constexpr (T == QuantType::kQ8_0) {
      for (int64_t l = 0; l < kQ; ++l) w[l] = static_cast<int8_t>(blk[2 + l]);
    } else {
      constexpr int bias = T == QuantType::kQ4_0 ? 8 : 0;
      const uint8_t* qs = blk + (T == QuantType::kQ4_1 ? 4 : 2);
      for (int64_t l = 0; l < 16; ++l) {
        w[l] = (qs[l] & 0xF) - bias;
        w[l + 16] = (qs[l] >> 4) - bias;
      }
    }
    for (int r = 0; r < MR; ++r) {
      const int8_t* xq = a.q.data() + (i0 + r) * row_levels<T>(nb);
      int32_t dot = 0;
      for (int64_t e = 0; e < kQ; ++e) dot += w[e] * xq[level_at<T>(b, e)];
      const int64_t xb = (i0 + r) * nb + b;
      add_block<T>(lanes[r], block_lane<T>(b), blk, dot, fp16_to_fp32(blk), a.d[xb],
                   T == QuantType::kQ4_1 ? a.s[xb] : 0.0f);
    }
  }
  for (int r = 0; r < MR; ++r) out[(i0 + r) * out_stride] = lanes_sum(lanes[r]);
}

#if LLM_ENGINE_HAVE_AVX2_PATH
// quantize_block32_generic with AVX2; the same result bit for bit (ties away from zero:
// truncate, then step away from zero where the exact remainder is at least one half).
__attribute__((target("avx2,fma"))) void quantize_block32_avx2(const float* x, int8_t* q,
                                                               float* d_out, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_loadu_ps(x + 8 * c);
    const __m256 a = _mm256_andnot_ps(sign, v[c]);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // NaN or inf
    amax = _mm256_max_ps(amax, a);
  }
  if (_mm256_movemask_ps(bad)) {
    std::memset(q, 0, kQ);
    *d_out = std::numeric_limits<float>::quiet_NaN();
    *sum = 0;
    return;
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.0f;
  const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256i iv[4];
  __m256i isum = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    const __m256 s = _mm256_mul_ps(v[c], id);
    const __m256 t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(s, t)), half, _CMP_GE_OQ);
    const __m256 step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(sign, s)));
    iv[c] = _mm256_cvtps_epi32(_mm256_add_ps(t, step));
    isum = _mm256_add_epi32(isum, iv[c]);
  }
  // int32 -> int8 with packs (exact: |level| <= 127), then undo packs' lane interleave.
  const __m256i p16a = _mm256_packs_epi32(iv[0], iv[1]);
  const __m256i p16b = _mm256_packs_epi32(iv[2], iv[3]);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *d_out = d;
  *sum = _mm_cvtsi128_si32(s4);
}

// The fp16 pairs at the starts of the 8 blocks at blk + offsets[i] as fp32 vectors: the
// first of each pair (d) into *dw, the second (Q4_1's m; other types' first level bytes,
// unused) into *mw.
// Lanes outside `mask` are 0.
__attribute__((target("avx2,f16c"))) inline void block_scales8(const uint8_t* blk,
                                                              __m256i offsets, __m256i mask,
                                                              __m256* dw, __m256* mw) {
  const __m256i dm = _mm256_mask_i32gather_epi32(
      _mm256_setzero_si256(), reinterpret_cast<const int*>(blk), offsets, mask, 1);
  const __m256i split = _mm256_shuffle_epi8(
      dm, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9,
                           12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
  const __m256i halves = _mm256_permute4x64_epi64(split, 0xD8);  // d0-7 | m0-7
  *dw = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  *mw = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
}

// Q8_0 block's dot product with 32 x levels in value order, in 8 int32 lanes: |w| times
// x with w's sign (maddubs takes an unsigned first operand).
__attribute__((target("avx2"))) inline __m256i q8_dot(__m256i wb, const int8_t* xq) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  return _mm256_madd_epi16(
      _mm256_maddubs_epi16(_mm256_sign_epi8(wb, wb), _mm256_sign_epi8(xv, wb)),
      _mm256_set1_epi16(1));
}

// Two nibble blocks' levels (qs of 16 bytes each) as [low nibbles of a | of b] and
// [high nibbles of a | of b]: the layout of their x levels.
__attribute__((target("avx2"))) inline void nibble_pair(const uint8_t* qa, const uint8_t* qb,
                                                       __m256i* lo, __m256i* hi) {
  const __m256i raw = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)), 1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  *lo = _mm256_and_si256(raw, low4);
  *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
}

// The unsigned nibble dot products of a pair with its 64 x levels (layout above): lanes
// 0-3 partial sums of block a, 4-7 of block b (int16 sums stay below 2 * 2 * 15 * 127).
__attribute__((target("avx2"))) inline __m256i nibble_pair_dot(__m256i lo, __m256i hi,
                                                              const int8_t* xq) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + kQ));
  return _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)),
      _mm256_set1_epi16(1));
}

// 8 floats from p (those in `in_mem` where Partial, the others 0) in lane order.
template <bool Partial>
__attribute__((target("avx2"))) inline __m256 load_lanes(const float* p, __m256i in_mem,
                                                        __m256i order) {
  return _mm256_permutevar8x32_ps(Partial ? _mm256_maskload_ps(p, in_mem) : _mm256_loadu_ps(p),
                                  order);
}

// The 8 blocks from block b of weight row wj (only the first t where Partial: the last
// group of a row) against MR x rows (levels xrow apart), into acc. Missing blocks add
// exactly +0 to their lanes (dot, scale and dx all zero), which leaves them unchanged.
template <QuantType T, int MR, bool Partial>
__attribute__((target("avx2,fma,f16c"))) inline void int8_group_avx2(
    const uint8_t* wj, int64_t b, int t, int64_t nb, const Int8Rows& a, int64_t i0, __m256i order,
    __m256i offsets, __m256* acc) {
  constexpr int64_t bb = block_bytes<T>();
  constexpr int64_t qs_at = T == QuantType::kQ4_1 ? 4 : 2;
  const int64_t xrow = row_levels<T>(nb);
  const int8_t* xq = a.q.data() + i0 * xrow + b * kQ;
  const uint8_t* blk = wj + b * bb;
  const __m256i zero = _mm256_setzero_si256();
  __m256i dots[MR];
  if constexpr (nibbles<T>()) {
    // Pairs (0,1), (2,3) then (4,5), (6,7): hadd leaves [0 2 4 6 | 1 3 5 7].
    __m256i half[2][MR];
    for (int h = 0; h < 2; ++h) {
      __m256i pd[2][MR];
      for (int p = 0; p < 2; ++p) {
        const int first = 4 * h + 2 * p;  // the pair's first block in the group
        if (Partial && first >= t) {
          for (int r = 0; r < MR; ++r) pd[p][r] = zero;
          continue;
        }
        const uint8_t* qa = blk + first * bb + qs_at;
        __m256i lo, hi;
        nibble_pair(qa, Partial && first + 1 >= t ? qa : qa + bb, &lo, &hi);
        for (int r = 0; r < MR; ++r) pd[p][r] = nibble_pair_dot(lo, hi, xq + r * xrow + first * kQ);
      }
      for (int r = 0; r < MR; ++r) half[h][r] = _mm256_hadd_epi32(pd[0][r], pd[1][r]);
    }
    for (int r = 0; r < MR; ++r) dots[r] = _mm256_hadd_epi32(half[0][r], half[1][r]);
  } else {
    // Blocks 0-3 and 4-7: two hadd levels leave [0-3 lanes 0-3 | 0-3 lanes 4-7].
    __m256i half[2][MR];
    for (int h = 0; h < 2; ++h) {
      __m256i pd[4][MR];
      for (int c = 0; c < 4; ++c) {
        const int at = 4 * h + c;
        if (Partial && at >= t) {
          for (int r = 0; r < MR; ++r) pd[c][r] = zero;
          continue;
        }
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + at * bb + 2));
        for (int r = 0; r < MR; ++r) pd[c][r] = q8_dot(w, xq + r * xrow + at * kQ);
      }
      for (int r = 0; r < MR; ++r) {
        half[h][r] = _mm256_hadd_epi32(_mm256_hadd_epi32(pd[0][r], pd[1][r]),
                                       _mm256_hadd_epi32(pd[2][r], pd[3][r]));
      }
    }
    for (int r = 0; r < MR; ++r) {
      dots[r] = _mm256_add_epi32(_mm256_permute2x128_si256(half[0][r], half[1][r], 0x20),
                                 _mm256_permute2x128_si256(half[0][r], half[1][r], 0x31));
    }
  }
  // Masks of the blocks present: in memory order (x's per-block arrays) and lane order.
  const __m256i in_mem =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i in_lane = _mm256_cmpgt_epi32(_mm256_set1_epi32(t), order);
  __m256 dw, mw;
  block_scales8(blk, offsets, Partial ? in_lane : _mm256_set1_epi32(-1), &dw, &mw);
  for (int r = 0; r < MR; ++r) {
    const int64_t xb = (i0 + r) * nb + b;
    if constexpr (T == QuantType::kQ4_0) {
      const int* sp = a.sum.data() + xb;
      const __m256i s = _mm256_permutevar8x32_epi32(
          Partial ? _mm256_maskload_epi32(sp, in_mem)
                  : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)),
          order);
      dots[r] = _mm256_sub_epi32(dots[r], _mm256_slli_epi32(s, 3));
    }
    const __m256 d = _mm256_mul_ps(dw, load_lanes<Partial>(a.d.data() + xb, in_mem, order));
    acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dots[r]), acc[r]);
    if constexpr (T == QuantType::kQ4_1) acc[r] = _mm256_fmadd_ps(mw, load_lanes<Partial>(a.s.data() + xb, in_mem, order), acc[r]);
  }
}

template <QuantType T, int MR>
__attribute__((target("avx2,fma,f16c"))) void int8_dot_avx2(const uint8_t* wj, int64_t nb,
                                                            const Int8Rows& a, int64_t i0,
                                                            float* out, int64_t out_stride) {
  // Lane i of a group holds block order[i] (see block_lane).
  const __m256i order = nibbles<T>() ? _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)
                                     : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i offsets =
      _mm256_mullo_epi32(order, _mm256_set1_epi32(static_cast<int>(block_bytes<T>())));
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + kLanes <= nb; b += kLanes) {
    int8_group_avx2<T, MR, false>(wj, b, kLanes, nb, a, i0, order, offsets, acc);
  }
  if (b < nb) int8_group_avx2<T, MR, true>(wj, b, static_cast<int>(nb - b), nb, a, i0, order, offsets, acc);
  for (int r = 0; r < MR; ++r) {
    float lanes[kLanes];
    _mm256_storeu_ps(lanes, acc[r]);
    out[(i0 + r) * out_stride] = lanes_sum(lanes);
  }
}
#endif

}  // namespace

void quant_internal::quantize_block32(const float* x, int8_t* q, float* d, int32_t* sum) {
#if LLM_ENGINE_HAVE_AVX2_PATH
  if (int8_use_avx2()) return quantize_block32_avx2(x, q, d, sum);
#endif
  quantize_block32_generic(x, q, d, sum);
}

namespace {

template <QuantType T, int MR>
void int8_dot(const uint8_t* wj, int64_t nb, const Int8Rows& a, int64_t i0, float* out,
              int64_t out_stride) {
#if LLM_ENGINE_HAVE_AVX2_PATH
  if (int8_use_avx2()) return int8_dot_avx2<T, MR>(wj, nb, a, i0, out, out_stride);
#endif
  int8_dot_generic<T, MR>(wj, nb, a, i0, out, out_stride);
}

// x (m, k) rounded per block into the layout the kernels read.
template <QuantType T>
Int8Rows quantize_rows(const float* x, int64_t m, int64_t k) {
  const int64_t nb = k / kQ;
  Int8Rows a;
  a.q.assign(m * row_levels<T>(nb), 0);
  a.d.resize(m * nb);
  if constexpr (T == QuantType::kQ4_1) a.s.resize(m * nb);
  if constexpr (T == QuantType::kQ4_0) a.sum.resize(m * nb);
  int8_t levels[kQ];
  for (int64_t i = 0; i < m; ++i) {
    int8_t* row = a.q.data() + i * row_levels<T>(nb);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t xb = i * nb + b;
      int32_t sum;
      quantize_block32(x + xb * kQ, levels, &a.d[xb], &sum);
      if constexpr (T == QuantType::kQ4_1) a.s[xb] = a.d[xb] * static_cast<float>(sum);
      if constexpr (T == QuantType::kQ4_0) a.sum[xb] = sum;
      std::memcpy(row + level_at<T>(b, 0), levels, 16);
      std::memcpy(row + level_at<T>(b, 16), levels + 16, 16);
    }
  }
  return a;
}

// x rows per pass over a weight row: more keep too many vectors live for AVX2's 16.
constexpr int kInt8RowTile = 2;

template <QuantType T>
void matmul_int8_blocks32(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                          int64_t m, int64_t n, int64_t k, [[maybe_unused]] int num_threads) {
  const int64_t nb = k / kQ;
  const Int8Rows a = quantize_rows<T>(x, m, k);
  const int64_t row_bytes = nb * block_bytes<T>();
#pragma omp parallel for if (m * n * k >= kMinParallelWork) num_threads(num_threads) \
    schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t* wj = w + j * row_bytes;
    float* oj = out + j;
    int64_t i = 0;
    for (; i + kInt8RowTile <= m; i += kInt8RowTile) {
      int8_dot<T, kInt8RowTile>(wj, nb, a, i, oj, out_stride);
    }
    for (; i < m; ++i) int8_dot<T, 1>(wj, nb, a, i, oj, out_stride);
  }
}

// The 32-value block types' matmul (kInt8: with x rounded to int8) for `type`; false,
// having done nothing, for the K-quants.
template <bool kInt8>
bool matmul_blocks32_of(QuantType type, float* out, int64_t out_stride, const float* x,
                        const uint8_t* w, int64_t m, int64_t n, int64_t k, int num_threads) {
  const auto run = [&](auto tag) {
    constexpr QuantType T = decltype(tag)::value;
    if constexpr (kInt8) {
      matmul_int8_blocks32<T>(out, out_stride, x, w, m, n, k, num_threads);
    } else {
      matmul_blocks32<T>(out, out_stride, x, w, m, n, k, num_threads);
    }
    return true;
  };
  switch (type) {
    case QuantType::kQ8_0: return run(std::integral_constant<QuantType, QuantType::kQ8_0>{});
    case QuantType::kQ4_0: return run(std::integral_constant<QuantType, QuantType::kQ4_0>{});
    case QuantType::kQ4_1: return run(std::integral_constant<QuantType, QuantType::kQ4_1>{});
    default: return false;
  }
}

}  // namespace

bool quant_matmul_int8_supported(QuantType type) { return is_block32(type); }

void quant_matmul_int8(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                       QuantType type, int64_t m, int64_t n, int64_t k, int num_threads,
                       QuantLayout layout) {
  if (m == 0 || n == 0) return;
  if (layout == QuantLayout::kRows8) {
    return matmul_rows8(out, out_stride, x, w, type, m, n, k, num_threads, /*int8=*/true);
  }
  if (!matmul_blocks32_of<true>(type, out, out_stride, x, w, m, n, k, num_threads)) {
    throw std::invalid_argument("quant_matmul_int8 does not take this quantization type");
  }
}

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
                      [[maybe_unused]] int num_threads, QuantLayout layout) {
  if (layout == QuantLayout::kRows8) return dequantize_rows8(out, blocks, type, rows, k, num_threads);
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
                  QuantType type, int64_t m, int64_t n, int64_t k, int num_threads,
                  QuantLayout layout) {
  if (m == 0 || n == 0) return;
  if (layout == QuantLayout::kRows8) {
    return matmul_rows8(out, out_stride, x, w, type, m, n, k, num_threads, /*int8=*/false);
  }
  if (!matmul_blocks32_of<false>(type, out, out_stride, x, w, m, n, k, num_threads)) {
    matmul_kquant(out, out_stride, x, w, type, m, n, k, num_threads);
  }
}

}  // namespace llm_engine
