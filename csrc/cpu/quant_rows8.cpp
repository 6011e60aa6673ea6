// The kRows8 layout (quant_matmul.h) of Q8_0 / Q4_0 / Q4_1 weights: moving blocks into and
// out of it, dequantizing it, and x @ W^T from it with fp32 or int8 activations.
//
// Both matmuls give each of a group's 8 weight rows a lane of one 8-float vector, take
// up to kTile x rows per pass over a group (its chunks expanded once for all of them), and
// write 8 adjacent outputs per x row with one store.
// - fp32: level l of the 8 rows is one vector, from a shift and a mask of its chunk; each
//   x row's value l is broadcast and multiplied in (an fma per x row and level). Per
//   block and x row: s = sum_l x_l q_l, acc = fma(dw, s, acc), and for Q4_1 acc =
//   fma(mw, sum_l x_l, acc).
// - int8: x rounded per block as for quant_matmul_int8; a chunk's 4 levels of 8 rows meet
//   the 4 matching x levels, broadcast, in one maddubs (unsigned nibbles times signed x;
//   Q8_0 takes |w| times x with w's sign). The int16 sums of a 4-bit block stay within
//   8 * 2 * 15 * 127 < 2^15, so they are added before one madd makes them int32. Per
//   block and x row: acc = fma(dw * dx, dot, acc), and for Q4_1 acc = fma(mw, dx *
//   sum(q), acc); Q4_0's -8 is folded in as dot - 8 * sum(q).
// The plain C++ paths do the same operations in the same order per lane, so AVX2 and
// plain C++ agree bit for bit (LLM_ENGINE_QUANT_GENERIC picks the plain one).
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "cpu/quant_blocks.h"

namespace llm_engine {
namespace {

using namespace quant_internal;

constexpr int64_t kGroup = 8;  // weight rows per group
constexpr int kTile = 4;       // x rows per pass over a group

// Bytes of a block before its levels: d, and m for Q4_1.
template <QuantType T>
constexpr int64_t head_bytes() {
  return T == QuantType::kQ4_1 ? 4 : 2;
}
// 4-byte pieces of a block's levels: 8 for Q8_0, 4 for the 4-bit types.
template <QuantType T>
constexpr int64_t chunks() {
  return (block_bytes<T>() - head_bytes<T>()) / 4;
}
// A record: one block of each of a group's 8 rows.
template <QuantType T>
constexpr int64_t record_bytes() {
  return kGroup * block_bytes<T>();
}
// Where the level chunks start in a record (after the scales).
template <QuantType T>
constexpr int64_t record_levels() {
  return kGroup * head_bytes<T>();
}

// Between a record and its 8 blocks (block_stride bytes apart): into the record when
// kToRecord, out of it otherwise.
template <QuantType T, bool kToRecord>
void move_record(uint8_t* dst, const uint8_t* src, int64_t block_stride) {
  for (int64_t r = 0; r < kGroup; ++r) {
    const auto move = [&](int64_t in_record, int64_t in_block, int64_t n) {
      if constexpr (kToRecord) {
        std::memcpy(dst + in_record, src + r * block_stride + in_block, n);
      } else {
        std::memcpy(dst + r * block_stride + in_block, src + in_record, n);
      }
    };
    move(2 * r, 0, 2);
    if constexpr (T == QuantType::kQ4_1) move(2 * kGroup + 2 * r, 2, 2);
    for (int64_t c = 0; c < chunks<T>(); ++c) {
      move(record_levels<T>() + 32 * c + 4 * r, head_bytes<T>() + 4 * c, 4);
    }
  }
}

// f(std::integral_constant<QuantType, type>) for the types kRows8 takes.
template <typename F>
void with_rows8_type(QuantType type, F&& f) {
  switch (type) {
    case QuantType::kQ8_0: return f(std::integral_constant<QuantType, QuantType::kQ8_0>{});
    case QuantType::kQ4_0: return f(std::integral_constant<QuantType, QuantType::kQ4_0>{});
    case QuantType::kQ4_1: return f(std::integral_constant<QuantType, QuantType::kQ4_1>{});
    default: throw std::invalid_argument("the rows8 layout takes q8_0, q4_0 and q4_1 blocks only");
  }
}

// Level l of row r of a record (Q4_0's without its -8).
template <QuantType T>
inline int32_t record_level(const uint8_t* rec, int64_t r, int64_t l) {
  const int64_t byte = T == QuantType::kQ8_0 ? l : l % 16;
  const uint8_t v = rec[record_levels<T>() + 32 * (byte / 4) + 4 * r + byte % 4];
  if constexpr (T == QuantType::kQ8_0) return static_cast<int8_t>(v);
  return l < 16 ? v & 0xF : v >> 4;
}

// The order in which both fp32 paths take a block's levels: chunk by chunk, byte by byte,
// and for the 4-bit types the low nibble (level 4c + t) before the high (16 + 4c + t).
template <QuantType T, typename F>
inline void for_each_level(F&& f) {
  for (int c = 0; c < chunks<T>(); ++c) {
    for (int t = 0; t < 4; ++t) {
      f(c, t, 4 * c + t);
      if constexpr (T != QuantType::kQ8_0) f(c, t, 16 + 4 * c + t);
    }
  }
}

// x rows rounded to int8 per block, levels in value order: q (m, k), d (m, nb),
// s = d * sum(q) for Q4_1, sum = sum(q) for Q4_0.
struct Int8X {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<float> s;
  std::vector<int32_t> sum;
};

Int8X quantize_x(const float* x, int64_t m, int64_t k) {
  const int64_t blocks = m * (k / kQ);
  Int8X a;
  a.q.resize(m * k);
  a.d.resize(blocks);
  a.s.resize(blocks);
  a.sum.resize(blocks);
  for (int64_t xb = 0; xb < blocks; ++xb) {
    quantize_block32(x + xb * kQ, a.q.data() + xb * kQ, &a.d[xb], &a.sum[xb]);
    a.s[xb] = a.d[xb] * static_cast<float>(a.sum[xb]);
  }
  return a;
}

// What a pass over one group reads of the x rows: rows i0 .. i0 + MR - 1.
struct XRows {
  const float* x;      // (m, k) fp32
  const float* xsum;   // (m, nb): each x block's sum (fp32 route, Q4_1)
  const Int8X* int8;   // the rounded rows (int8 route)
  int64_t k;
  int64_t nb;
};

// out[(i0 + r) * out_stride + j] for the MR x rows and the group's 8 rows j, fp32 route.
template <QuantType T, int MR>
void group_fp32_generic(const uint8_t* g, const XRows& a, int64_t i0, float* out,
                        int64_t out_stride) {
  float acc[MR][kGroup] = {};
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* rec = g + b * record_bytes<T>();
    float s[MR][kGroup] = {};
    for_each_level<T>([&](int, int, int l) {
      for (int64_t j = 0; j < kGroup; ++j) {
        const int32_t bias = T == QuantType::kQ4_0 ? 8 : 0;
        const float q = static_cast<float>(record_level<T>(rec, j, l) - bias);
        for (int r = 0; r < MR; ++r) s[r][j] = std::fma(a.x[(i0 + r) * a.k + b * kQ + l], q, s[r][j]);
      }
    });
    for (int64_t j = 0; j < kGroup; ++j) {
      const float dw = fp16_to_fp32(rec + 2 * j);
      for (int r = 0; r < MR; ++r) {
        acc[r][j] = std::fma(dw, s[r][j], acc[r][j]);
        if constexpr (T == QuantType::kQ4_1) {
          acc[r][j] = std::fma(fp16_to_fp32(rec + 2 * kGroup + 2 * j),
                               a.xsum[(i0 + r) * a.nb + b], acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(out + (i0 + r) * out_stride, acc[r], sizeof(acc[r]));
}

// The same for the int8 route.
template <QuantType T, int MR>
void group_int8_generic(const uint8_t* g, const XRows& a, int64_t i0, float* out,
                        int64_t out_stride) {
  const Int8X& x = *a.int8;
  float acc[MR][kGroup] = {};
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* rec = g + b * record_bytes<T>();
    for (int r = 0; r < MR; ++r) {
      const int64_t xb = (i0 + r) * a.nb + b;
      const int8_t* xq = x.q.data() + xb * kQ;
      for (int64_t j = 0; j < kGroup; ++j) {
        int32_t dot = 0;
        for (int64_t l = 0; l < kQ; ++l) dot += record_level<T>(rec, j, l) * xq[l];
        if constexpr (T == QuantType::kQ4_0) dot -= 8 * x.sum[xb];
        const float dw = fp16_to_fp32(rec + 2 * j);
        acc[r][j] = std::fma(dw * x.d[xb], static_cast<float>(dot), acc[r][j]);
        if constexpr (T == QuantType::kQ4_1) {
          acc[r][j] = std::fma(fp16_to_fp32(rec + 2 * kGroup + 2 * j), x.s[xb], acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(out + (i0 + r) * out_stride, acc[r], sizeof(acc[r]));
}

#if LLM_ENGINE_HAVE_AVX2_PATH
// Level 4c + t (low) or 16 + 4c + t (high nibble) of the 8 rows from chunk c, as floats
// (Q4_0's -8 included; Q8_0 has only the "low" ones).
template <QuantType T, bool kHigh>
__attribute__((target("avx2"))) inline __m256 chunk_levels(__m256i chunk, int t) {
  if constexpr (T == QuantType::kQ8_0) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sll_epi32(chunk, _mm_cvtsi32_si128(24 - 8 * t)), 24));
  } else {
    __m256i v = _mm256_and_si256(_mm256_srl_epi32(chunk, _mm_cvtsi32_si128(8 * t + (kHigh ? 4 : 0))),
                                 _mm256_set1_epi32(0xF));
    if constexpr (T == QuantType::kQ4_0) v = _mm256_sub_epi32(v, _mm256_set1_epi32(8));
    return _mm256_cvtepi32_ps(v);
  }
}

template <QuantType T, int MR>
__attribute__((target("avx2,fma,f16c"))) void group_fp32_avx2(const uint8_t* g, const XRows& a,
                                                              int64_t i0, float* out,
                                                              int64_t out_stride) {
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* rec = g + b * record_bytes<T>();
    const float* xb = a.x + i0 * a.k + b * kQ;
    __m256 s[MR];
    for (int r = 0; r < MR; ++r) s[r] = _mm256_setzero_ps();
    for (int c = 0; c < chunks<T>(); ++c) {
      const __m256i chunk =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + record_levels<T>() + 32 * c));
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const __m256 lo = chunk_levels<T, false>(chunk, t);
        for (int r = 0; r < MR; ++r) {
          s[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + r * a.k + 4 * c + t), lo, s[r]);
        }
        if constexpr (T != QuantType::kQ8_0) {
          const __m256 hi = chunk_levels<T, true>(chunk, t);
          for (int r = 0; r < MR; ++r) {
            s[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + r * a.k + 16 + 4 * c + t), hi, s[r]);
          }
        }
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(dw, s[r], acc[r]);
    if constexpr (T == QuantType::kQ4_1) {
      const __m256 mw =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 2 * kGroup)));
      for (int r = 0; r < MR; ++r) {
        acc[r] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(a.xsum + (i0 + r) * a.nb + b), acc[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + (i0 + r) * out_stride, acc[r]);
}

// x levels 4c .. 4c + 3 of a block in every 32-bit lane.
__attribute__((target("avx2"))) inline __m256i x_chunk(const int8_t* xq, int c) {
  int32_t v;
  std::memcpy(&v, xq + 4 * c, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Each x row's block sum is kept running by an empty asm after each step: GCC would
// otherwise reassociate the integer adds into a tree over all of a block's products,
// which needs more vector registers than AVX2 has, and spill them to the stack.
template <QuantType T, int MR>
__attribute__((target("avx2,fma,f16c"))) void group_int8_avx2(const uint8_t* g, const XRows& a,
                                                              int64_t i0, float* out,
                                                              int64_t out_stride) {
  const Int8X& x = *a.int8;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* rec = g + b * record_bytes<T>();
    const __m256i* levels = reinterpret_cast<const __m256i*>(rec + record_levels<T>());
    const int8_t* xq = x.q.data() + (i0 * a.nb + b) * kQ;  // x row i0's block b
    const int64_t xrow = a.k;                              // levels between x rows
    __m256i dot[MR];
    if constexpr (T == QuantType::kQ8_0) {
      for (int r = 0; r < MR; ++r) dot[r] = _mm256_setzero_si256();
      for (int c = 0; c < chunks<T>(); ++c) {
        const __m256i w = _mm256_loadu_si256(levels + c);
        const __m256i aw = _mm256_abs_epi8(w);
        for (int r = 0; r < MR; ++r) {
          const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x_chunk(xq + r * xrow, c), w));
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p, ones));
          asm("" : "+x"(dot[r]));  // keep the sum running (see above)
        }
      }
    } else {
      const __m256i low4 = _mm256_set1_epi8(0x0F);
      __m256i s16[MR];
      for (int r = 0; r < MR; ++r) s16[r] = _mm256_setzero_si256();
      for (int c = 0; c < chunks<T>(); ++c) {
        const __m256i w = _mm256_loadu_si256(levels + c);
        const __m256i lo = _mm256_and_si256(w, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
        for (int r = 0; r < MR; ++r) {
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, x_chunk(xq + r * xrow, c)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, x_chunk(xq + r * xrow, 4 + c)));
          asm("" : "+x"(s16[r]));  // keep the sum running (see above)
        }
      }
      for (int r = 0; r < MR; ++r) {
        dot[r] = _mm256_madd_epi16(s16[r], ones);
        if constexpr (T == QuantType::kQ4_0) {
          dot[r] = _mm256_sub_epi32(dot[r], _mm256_set1_epi32(8 * x.sum[(i0 + r) * a.nb + b]));
        }
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
    for (int r = 0; r < MR; ++r) {
      const int64_t xb = (i0 + r) * a.nb + b;
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(x.d[xb])),
                               _mm256_cvtepi32_ps(dot[r]), acc[r]);
    }
    if constexpr (T == QuantType::kQ4_1) {
      const __m256 mw =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 2 * kGroup)));
      for (int r = 0; r < MR; ++r) {
        acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s[(i0 + r) * a.nb + b]), acc[r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(out + (i0 + r) * out_stride, acc[r]);
}
#endif

template <QuantType T, bool kInt8, int MR>
void group_pass(const uint8_t* g, const XRows& a, int64_t i0, float* out, int64_t out_stride) {
#if LLM_ENGINE_HAVE_AVX2_PATH
  if (int8_use_avx2()) {
    if constexpr (kInt8) return group_int8_avx2<T, MR>(g, a, i0, out, out_stride);
    return group_fp32_avx2<T, MR>(g, a, i0, out, out_stride);
  }
#endif
  if constexpr (kInt8) return group_int8_generic<T, MR>(g, a, i0, out, out_stride);
  group_fp32_generic<T, MR>(g, a, i0, out, out_stride);
}

// out (m, 8 * groups) from the whole groups of w.
template <QuantType T, bool kInt8>
void matmul_groups(float* out, int64_t out_stride, const float* x, const uint8_t* w, int64_t m,
                   int64_t groups, int64_t k, [[maybe_unused]] int num_threads) {
  const int64_t nb = k / kQ;
  Int8X int8;
  std::vector<float> xsum;
  if constexpr (kInt8) {
    int8 = quantize_x(x, m, k);
  } else if constexpr (T == QuantType::kQ4_1) {
    xsum.resize(m * nb);
    for (int64_t xb = 0; xb < m * nb; ++xb) {
      float s = 0.0f;
      for (int64_t l = 0; l < kQ; ++l) s += x[xb * kQ + l];
      xsum[xb] = s;
    }
  }
  const XRows a{x, xsum.data(), &int8, k, nb};
  const int64_t group_bytes = nb * record_bytes<T>();
#pragma omp parallel for if (m * groups * kGroup * k >= kMinParallelWork) \
    num_threads(num_threads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = w + g * group_bytes;
    float* og = out + g * kGroup;
    int64_t i = 0;
    for (; i + kTile <= m; i += kTile) group_pass<T, kInt8, kTile>(wg, a, i, og, out_stride);
    switch (m - i) {
      case 3: group_pass<T, kInt8, 3>(wg, a, i, og, out_stride); break;
      case 2: group_pass<T, kInt8, 2>(wg, a, i, og, out_stride); break;
      case 1: group_pass<T, kInt8, 1>(wg, a, i, og, out_stride); break;
      default: break;
    }
  }
}

}  // namespace

bool quant_rows8_supported(QuantType type) { return is_block32(type); }

void quant_relayout(uint8_t* out, const uint8_t* blocks, QuantType type, int64_t rows,
                    int64_t k, bool to_rows8) {
  with_rows8_type(type, [&](auto tag) {
    constexpr QuantType T = decltype(tag)::value;
    const int64_t nb = k / kQ, bb = block_bytes<T>(), groups = rows / kGroup;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t group_at = g * kGroup * nb * bb;
        const int64_t rec_at = group_at + b * record_bytes<T>(), block_at = group_at + b * bb;
        if (to_rows8) {
          move_record<T, true>(out + rec_at, blocks + block_at, nb * bb);
        } else {
          move_record<T, false>(out + block_at, blocks + rec_at, nb * bb);
        }
      }
    }
    const int64_t done = groups * kGroup * nb * bb;
    std::memcpy(out + done, blocks + done, (rows - groups * kGroup) * nb * bb);
  });
}

void quant_internal::dequantize_rows8(float* out, const uint8_t* blocks, QuantType type,
                                      int64_t rows, int64_t k, int num_threads) {
  with_rows8_type(type, [&](auto tag) {
    constexpr QuantType T = decltype(tag)::value;
    const int64_t nb = k / kQ, groups = rows / kGroup;
#pragma omp parallel for if (rows * k >= kMinParallelWork) num_threads(num_threads) \
    schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t row_blocks[kGroup * block_bytes<T>()];
      for (int64_t b = 0; b < nb; ++b) {
        move_record<T, false>(row_blocks, blocks + (g * nb + b) * record_bytes<T>(),
                              block_bytes<T>());
        for (int64_t r = 0; r < kGroup; ++r) {
          dequantize_block(T, row_blocks + r * block_bytes<T>(),
                           out + (g * kGroup + r) * k + b * kQ);
        }
      }
    }
    const int64_t done = groups * kGroup;
    quant_dequantize(out + done * k, blocks + done * nb * block_bytes<T>(), T, rows - done, k,
                     num_threads);
  });
}

void quant_internal::matmul_rows8(float* out, int64_t out_stride, const float* x,
                                  const uint8_t* w, QuantType type, int64_t m, int64_t n,
                                  int64_t k, int num_threads, bool int8) {
  with_rows8_type(type, [&](auto tag) {
    constexpr QuantType T = decltype(tag)::value;
    const int64_t groups = n / kGroup, done = groups * kGroup;
    if (int8) {
      matmul_groups<T, true>(out, out_stride, x, w, m, groups, k, num_threads);
    } else {
      matmul_groups<T, false>(out, out_stride, x, w, m, groups, k, num_threads);
    }
    if (done == n) return;
    const uint8_t* tail = w + done * (k / kQ) * block_bytes<T>();
    if (int8) {
      quant_matmul_int8(out + done, out_stride, x, tail, T, m, n - done, k, num_threads);
    } else {
      quant_matmul(out + done, out_stride, x, tail, T, m, n - done, k, num_threads);
    }
  });
}

}  // namespace llm_engine
