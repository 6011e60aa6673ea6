#include "cpu/layer_ops.h"

#include <cmath>
#include <cstring>

#include "cpu/vectorize.h"

namespace llm_engine {
namespace {

// Below this many floats an op runs on the calling thread alone: waking a second
// thread costs more than the few microseconds it would save. (A build without OpenMP
// runs everything on the calling thread and never reads it.)
[[maybe_unused]] constexpr int64_t kMinParallelWork = 1 << 14;

LLM_ENGINE_ISA_CLONES
void rms_norm_row(float* out, float* residual_out, const float* x, const float* residual,
                  const float* weight, int64_t dim, float eps) {
  const float* s = x;
  float sum_sq = 0.0f;
  if (residual != nullptr) {
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < dim; ++i) {
      const float v = x[i] + residual[i];
      residual_out[i] = v;
      sum_sq += v * v;
    }
    s = residual_out;
  } else {
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < dim; ++i) sum_sq += x[i] * x[i];
  }
  const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) out[i] = s[i] * inv_rms * weight[i];
}

// silu(g) = g * sigmoid(g), with sigmoid from e = exp(-|g|) <= 1, which cannot overflow:
// 1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0.
LLM_ENGINE_ISA_CLONES
void silu_mul_row(float* out, const float* gate, const float* up, int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = gate[i];
    const float e = exp_nonpositive(-std::fabs(g));
    const float sigmoid = (g >= 0.0f ? 1.0f : e) / (1.0f + e);
    out[i] = g * sigmoid * up[i];
  }
}

LLM_ENGINE_ISA_CLONES
void rope_row(float* out, const float* x, const float* cos, const float* sin, int64_t heads,
              int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * head_dim;
    float* oh = out + h * head_dim;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) oh[i] = xh[i] * cos[i] + xh[i + half] * sin[i];
#pragma omp simd
    for (int64_t i = half; i < head_dim; ++i) oh[i] = xh[i] * cos[i] + xh[i - half] * sin[i];
  }
}

}  // namespace

void rms_norm(float* out, float* residual_out, const float* x, const float* residual,
              const float* weight, int64_t rows, int64_t dim, float eps,
              [[maybe_unused]] int num_threads) {
#pragma omp parallel for if (rows * dim >= kMinParallelWork) num_threads(num_threads) \
    schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    rms_norm_row(out + r * dim, residual != nullptr ? residual_out + r * dim : nullptr,
                 x + r * dim, residual != nullptr ? residual + r * dim : nullptr, weight, dim, eps);
  }
}

void silu_mul(float* out, const float* h, int64_t rows, int64_t width,
              [[maybe_unused]] int num_threads) {
#pragma omp parallel for if (rows * width >= kMinParallelWork) num_threads(num_threads) \
    schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    silu_mul_row(out + r * width, h + r * 2 * width, h + r * 2 * width + width, width);
  }
}

void rope(float* out, const float* x, int64_t x_stride, const float* cos, const float* sin,
          int64_t rows, int64_t heads, int64_t head_dim, [[maybe_unused]] int num_threads) {
  const int64_t row = heads * head_dim;
#pragma omp parallel for if (rows * row >= kMinParallelWork) num_threads(num_threads) \
    schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    rope_row(out + r * row, x + r * x_stride, cos + r * head_dim, sin + r * head_dim, heads,
             head_dim);
  }
}

void store_kv(float* k_cache, float* v_cache, const float* k, int64_t k_stride, const float* v,
              int64_t v_stride, const int64_t* slots, int64_t rows, int64_t row) {
  const size_t bytes = static_cast<size_t>(row) * sizeof(float);
  for (int64_t r = 0; r < rows; ++r) {
    if (slots[r] < 0) continue;
    std::memcpy(k_cache + slots[r] * row, k + r * k_stride, bytes);
    std::memcpy(v_cache + slots[r] * row, v + r * v_stride, bytes);
  }
}

}  // namespace llm_engine
