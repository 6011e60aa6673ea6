#include "cpu_attention/paged_decode.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace llm_engine {
namespace {

template <typename To, typename From>
inline To bit_cast(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// exp(x) for x <= 0 (scores minus their row maximum), within 2 ulp: x = n*ln2 + r with
// |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial, 2^n from the exponent bits.
// Written out so the compiler vectorises the softmax loop; below -87 exp is 0 in fp32.
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

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

struct DecodeArgs {
  float* out;
  const float* q;
  const float* k_cache;
  const float* v_cache;
  const int32_t* block_tables;
  const int32_t* context_lens;
  DecodeShape shape;
  float scale;
};

// Sequences [begin, end); kHeadDim > 0 fixes head_dim at compile time (the dot
// products and row updates then unroll fully, about twice as fast), 0 reads it
// from the shape. Each position's K (and V) row holds every kv head
// (kv_heads * head_dim floats, contiguous), so a block is read front to back once
// per pass. scratch holds heads * max context length floats: the scores, then the
// softmax numerators; inv_sum holds heads floats.
template <int64_t kHeadDim>
__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_seqs(const DecodeArgs& a, int64_t begin, int64_t end, float* scratch,
                 float* inv_sum) {
  const DecodeShape& s = a.shape;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t d = kHeadDim > 0 ? kHeadDim : s.head_dim;
  const int64_t row = s.kv_heads * d;  // one position of one block
  for (int64_t seq = begin; seq < end; ++seq) {
    const int64_t len = a.context_lens[seq];
    const float* q = a.q + seq * s.heads * d;
    float* out = a.out + seq * s.heads * d;
    std::fill(out, out + s.heads * d, 0.0f);
    if (len == 0) continue;
    const int32_t* table = a.block_tables + seq * s.max_blocks;

    for (int64_t start = 0; start < len; start += s.block_size) {  // scores
      const float* k = a.k_cache + table[start / s.block_size] * s.block_size * row;
      const int64_t n = std::min(s.block_size, len - start);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t h = 0; h < s.heads; ++h) {
          scratch[h * len + start + i] = dot(q + h * d, k + i * row + (h / group) * d, d) * a.scale;
        }
      }
    }
    for (int64_t h = 0; h < s.heads; ++h) {  // softmax numerators, in place
      float* p = scratch + h * len;
      float m = p[0];
#pragma omp simd reduction(max : m)
      for (int64_t i = 0; i < len; ++i) m = std::max(m, p[i]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < len; ++i) {
        p[i] = exp_nonpositive(p[i] - m);
        sum += p[i];
      }
      inv_sum[h] = 1.0f / sum;
    }
    for (int64_t start = 0; start < len; start += s.block_size) {  // weighted values
      const float* v = a.v_cache + table[start / s.block_size] * s.block_size * row;
      const int64_t n = std::min(s.block_size, len - start);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t h = 0; h < s.heads; ++h) {
          const float w = scratch[h * len + start + i];
          const float* vi = v + i * row + (h / group) * d;
          float* o = out + h * d;
#pragma omp simd
          for (int64_t e = 0; e < d; ++e) o[e] += w * vi[e];
        }
      }
    }
    for (int64_t h = 0; h < s.heads; ++h) {
      float* o = out + h * d;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) o[e] *= inv_sum[h];
    }
  }
}

// Below this many cached positions per thread a second thread costs more than it saves.
constexpr int64_t kMinWork = 1024;

}  // namespace

void check_decode_inputs(const int32_t* block_tables, const int32_t* context_lens,
                         const DecodeShape& s) {
  const int64_t capacity = s.max_blocks * s.block_size;
  for (int64_t seq = 0; seq < s.num_seqs; ++seq) {
    const int64_t len = context_lens[seq];
    if (len < 0 || len > capacity) {
      throw std::invalid_argument("context_lens[" + std::to_string(seq) + "] = " +
                                  std::to_string(len) + " must lie in [0, max_blocks * block_size = " +
                                  std::to_string(capacity) + "]");
    }
    const int64_t used = (len + s.block_size - 1) / s.block_size;
    for (int64_t b = 0; b < used; ++b) {
      const int64_t block = block_tables[seq * s.max_blocks + b];
      if (block < 0 || block >= s.num_blocks) {
        throw std::invalid_argument("block_tables[" + std::to_string(seq) + ", " +
                                    std::to_string(b) + "] = " + std::to_string(block) +
                                    " is not a block id in [0, " + std::to_string(s.num_blocks) +
                                    ")");
      }
    }
  }
}

void paged_decode_attention(float* out, const float* q, const float* k_cache,
                            const float* v_cache, const int32_t* block_tables,
                            const int32_t* context_lens, const DecodeShape& shape, float scale,
                            int num_threads) {
  const DecodeArgs args{out, q, k_cache, v_cache, block_tables, context_lens, shape, scale};
  int64_t max_len = 0;
  int64_t work = 0;
  for (int64_t seq = 0; seq < shape.num_seqs; ++seq) {
    max_len = std::max<int64_t>(max_len, context_lens[seq]);
    work += context_lens[seq];
  }
  const int64_t threads = std::clamp<int64_t>(std::min<int64_t>(num_threads, work / kMinWork), 1,
                                              std::max<int64_t>(shape.num_seqs, 1));
  // The OpenMP runtime is the one PyTorch loaded (same soname), so these are the
  // threads its own ops use, already awake, and never more threads than cores.
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    std::vector<float> scratch(static_cast<size_t>(shape.heads * max_len));
    std::vector<float> inv_sum(static_cast<size_t>(shape.heads));
#pragma omp for schedule(dynamic, 1)
    for (int64_t seq = 0; seq < shape.num_seqs; ++seq) {
      switch (shape.head_dim) {
        case 64:
          attend_seqs<64>(args, seq, seq + 1, scratch.data(), inv_sum.data());
          break;
        case 128:
          attend_seqs<128>(args, seq, seq + 1, scratch.data(), inv_sum.data());
          break;
        default:
          attend_seqs<0>(args, seq, seq + 1, scratch.data(), inv_sum.data());
      }
    }
  }
}

}  // namespace llm_engine
