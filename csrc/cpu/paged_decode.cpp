#include "cpu/paged_decode.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/vectorize.h"

namespace llm_engine {
namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

#if LLM_ENGINE_HAVE_AVX2_PATH
// scores[j] = scale * (q . k[j * row .. + kHeadDim)) for 8 positions j: 8 running dot
// products, then one transposing reduction (hadd, hadd, a lane swap) of all 8 at once.
template <int64_t kHeadDim>
__attribute__((target("avx2,fma"))) void scores8_avx2(const float* q, const float* k,
                                                      int64_t row, float scale, float* scores) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t e = 0; e < kHeadDim; e += 8) {
    const __m256 qv = _mm256_loadu_ps(q + e);
    for (int j = 0; j < 8; ++j) {
      acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * row + e), acc[j]);
    }
  }
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                                    _mm256_permute2f128_ps(s0, s1, 0x31));
  _mm256_storeu_ps(scores, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
}

// acc[0 .. 64) += sum_i weights[i] * v[i * row .. + 64), the 64 sums held in registers.
__attribute__((target("avx2,fma"))) void values64_avx2(const float* weights, const float* v,
                                                       int64_t row, int64_t n, float* acc) {
  __m256 sum[8];
  for (int j = 0; j < 8; ++j) sum[j] = _mm256_loadu_ps(acc + 8 * j);
  for (int64_t i = 0; i < n; ++i) {
    const __m256 w = _mm256_broadcast_ss(weights + i);
    for (int j = 0; j < 8; ++j) {
      sum[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + i * row + 8 * j), sum[j]);
    }
  }
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(acc + 8 * j, sum[j]);
}
#endif

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

// Positions [p0, p1) of sequence seq: the chunk's softmax statistics and its
// unnormalised output, per head h, into partial + h * (head_dim + 2):
// acc[head_dim] = sum_i exp(s_i - m) v_i, then m = max_i s_i, then l = sum_i exp(s_i - m).
// kHeadDim > 0 fixes head_dim at compile time (the dot products and row updates then
// unroll fully, about twice as fast); 0 reads it from the shape. Each position's K
// (and V) row holds every kv head (kv_heads * head_dim floats, contiguous). With AVX2,
// a head_dim that is a multiple of 8 takes its scores 8 positions at a time
// (scores8_avx2), and a multiple of 64 keeps each head's weighted sum in registers over
// a block's positions (values64_avx2). scratch holds heads * (p1 - p0) floats.
template <int64_t kHeadDim>
LLM_ENGINE_ISA_CLONES
void attend_chunk(const DecodeArgs& a, int64_t seq, int64_t p0, int64_t p1, float* scratch,
                  float* partial) {
  const DecodeShape& s = a.shape;
  const int64_t group = s.heads / s.kv_heads;
  const int64_t d = kHeadDim > 0 ? kHeadDim : s.head_dim;
  const int64_t row = s.kv_heads * d;  // one position of one block
  const int64_t width = p1 - p0;
  const float* q = a.q + seq * s.heads * d;
  const int32_t* table = a.block_tables + seq * s.max_blocks;
  // Calls f(rows of the cache at positions [p, p + n), p - p0, n) block by block.
  const auto for_each_run = [&](const float* cache, auto&& f) {
    for (int64_t p = p0; p < p1;) {
      const int64_t off = p % s.block_size;
      const int64_t n = std::min(s.block_size - off, p1 - p);
      f(cache + (table[p / s.block_size] * s.block_size + off) * row, p - p0, n);
      p += n;
    }
  };

  for_each_run(a.k_cache, [&](const float* k, int64_t at, int64_t n) {  // scores
    float* scores = scratch + at;
    int64_t i = 0;
#if LLM_ENGINE_HAVE_AVX2_PATH
    if constexpr (kHeadDim % 8 == 0 && kHeadDim > 0) {
      if (cpu_has_avx2()) {
        for (; i + 8 <= n; i += 8) {
          for (int64_t h = 0; h < s.heads; ++h) {
            scores8_avx2<kHeadDim>(q + h * d, k + i * row + (h / group) * d, row, a.scale,
                                   scores + h * width + i);
          }
        }
      }
    }
#endif
    for (; i < n; ++i) {
      for (int64_t h = 0; h < s.heads; ++h) {
        scores[h * width + i] = dot(q + h * d, k + i * row + (h / group) * d, d) * a.scale;
      }
    }
  });
  for (int64_t h = 0; h < s.heads; ++h) {  // softmax numerators, in place
    float* p = scratch + h * width;
    float m = p[0];
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < width; ++i) m = std::max(m, p[i]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) {
      p[i] = exp_nonpositive(p[i] - m);
      sum += p[i];
    }
    float* stats = partial + h * (d + 2);
    std::fill(stats, stats + d, 0.0f);
    stats[d] = m;
    stats[d + 1] = sum;
  }
  for_each_run(a.v_cache, [&](const float* v, int64_t at, int64_t n) {  // weighted values
    for (int64_t h = 0; h < s.heads; ++h) {
      const float* weights = scratch + h * width + at;
      const float* vh = v + (h / group) * d;
      float* acc = partial + h * (d + 2);
#if LLM_ENGINE_HAVE_AVX2_PATH
      if constexpr (kHeadDim % 64 == 0 && kHeadDim > 0) {
        if (cpu_has_avx2()) {
          for (int64_t e = 0; e < d; e += 64) values64_avx2(weights, vh + e, row, n, acc + e);
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < n; ++i) {
        const float w = weights[i];
        const float* vi = vh + i * row;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) acc[e] += w * vi[e];
      }
    }
  });
}

// out of one sequence from its chunks' partials: each chunk's share rescaled to the
// largest maximum, divided by the total of the softmax denominators.
void combine_chunks(const DecodeShape& s, const float* partials, int64_t chunks, float* out) {
  const int64_t d = s.head_dim;
  const int64_t stride = s.heads * (d + 2);  // between chunks
  for (int64_t h = 0; h < s.heads; ++h) {
    float* o = out + h * d;
    std::fill(o, o + d, 0.0f);
    if (chunks == 0) continue;  // empty context: zeros
    const float* first = partials + h * (d + 2);
    float m = first[d];
    for (int64_t c = 1; c < chunks; ++c) m = std::max(m, first[c * stride + d]);
    float denominator = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* part = first + c * stride;
      const float w = exp_nonpositive(part[d] - m);
      denominator += w * part[d + 1];
      for (int64_t e = 0; e < d; ++e) o[e] += w * part[e];
    }
    const float inv = 1.0f / denominator;
    for (int64_t e = 0; e < d; ++e) o[e] *= inv;
  }
}

// Positions per work item. Fixed, not derived from the thread count or the batch, so a
// sequence's result is the same whatever runs beside it and however many threads run.
constexpr int64_t kChunk = 512;

// Below this many cached positions per thread a second thread costs more than it saves.
constexpr int64_t kMinWork = 128;

}  // namespace

void check_decode_inputs(const int32_t* block_tables, const int32_t* context_lens,
                         const DecodeShape& s, int64_t window) {
  const int64_t capacity = s.max_blocks * s.block_size;
  for (int64_t seq = 0; seq < s.num_seqs; ++seq) {
    const int64_t len = context_lens[seq];
    if (len < 0 || len > capacity) {
      throw std::invalid_argument("context_lens[" + std::to_string(seq) + "] = " +
                                  std::to_string(len) + " must lie in [0, max_blocks * block_size = " +
                                  std::to_string(capacity) + "]");
    }
    const int64_t used = (len + s.block_size - 1) / s.block_size;
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) / s.block_size : 0;
    for (int64_t b = first; b < used; ++b) {
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
                            int num_threads, int64_t window) {
  const DecodeArgs args{out, q, k_cache, v_cache, block_tables, context_lens, shape, scale};
  // Work items: (sequence, chunk of kChunk positions from start[seq], the first position
  // in the window); first_item[seq] is seq's first.
  std::vector<int64_t> first_item(static_cast<size_t>(shape.num_seqs + 1), 0);
  std::vector<int64_t> start(static_cast<size_t>(shape.num_seqs), 0);
  int64_t work = 0;
  for (int64_t seq = 0; seq < shape.num_seqs; ++seq) {
    if (window > 0) start[seq] = std::max<int64_t>(0, context_lens[seq] - window);
    const int64_t len = context_lens[seq] - start[seq];
    first_item[seq + 1] = first_item[seq] + (len + kChunk - 1) / kChunk;
    work += len;
  }
  const int64_t items = first_item[shape.num_seqs];
  const int64_t per_item = shape.heads * (shape.head_dim + 2);
  std::vector<float> partials(static_cast<size_t>(items * per_item));
  [[maybe_unused]] const int64_t threads = std::clamp<int64_t>(
      std::min<int64_t>(num_threads, work / kMinWork), 1, std::max<int64_t>(items, 1));
  // The OpenMP runtime is the one PyTorch loaded (same soname), so these are the
  // threads its own ops use, already awake, and never more threads than cores.
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    std::vector<float> scratch(static_cast<size_t>(shape.heads * kChunk));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t seq =
          std::upper_bound(first_item.begin(), first_item.end(), item) - first_item.begin() - 1;
      const int64_t p0 = start[seq] + (item - first_item[seq]) * kChunk;
      const int64_t p1 = std::min<int64_t>(context_lens[seq], p0 + kChunk);
      float* partial = partials.data() + item * per_item;
      switch (shape.head_dim) {
        case 64:
          attend_chunk<64>(args, seq, p0, p1, scratch.data(), partial);
          break;
        case 128:
          attend_chunk<128>(args, seq, p0, p1, scratch.data(), partial);
          break;
        default:
          attend_chunk<0>(args, seq, p0, p1, scratch.data(), partial);
      }
    }
#pragma omp for schedule(static)
    for (int64_t seq = 0; seq < shape.num_seqs; ++seq) {
      combine_chunks(shape, partials.data() + first_item[seq] * per_item,
                     first_item[seq + 1] - first_item[seq], out + seq * shape.heads * shape.head_dim);
    }
  }
}

}  // namespace llm_engine
