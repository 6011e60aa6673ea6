// The per-token ops of a transformer layer on the CPU, in fp32: RMSNorm (with the
// residual add fused in), the SwiGLU activation, the rotary embedding and the store of
// new K/V rows into the paged cache. Each is one pass over its rows, spread over
// OpenMP threads when there is enough work, where PyTorch needs several ops (each one
// more trip through memory and through its dispatcher) for the same result.
//
// Arrays are row-major; a "row stride" is the distance in floats between consecutive
// rows, so a row may be a slice of a wider row (a head slice of a fused QKV output).
// The caller has checked every shape and index (see bindings.cpp).
#pragma once

#include <cstdint>

namespace llm_engine {

// out = s * rsqrt(mean(s^2) + eps) * weight per row, with s = x + residual when
// residual is given (and then s is written to residual_out), else s = x.
// out, residual_out, x, residual: (rows, dim) contiguous; weight: (dim,).
void rms_norm(float* out, float* residual_out, const float* x, const float* residual,
              const float* weight, int64_t rows, int64_t dim, float eps, int num_threads);

// out = silu(gate) * up, with gate = h[:, :width] and up = h[:, width:].
// out: (rows, width); h: (rows, 2 * width); both contiguous.
void silu_mul(float* out, const float* h, int64_t rows, int64_t width, int num_threads);

// The half-split rotary embedding: out = x * cos + swap_halves(x) * sin per head, with
// the sign of the first half folded into sin. out: (rows, heads, head_dim) contiguous;
// x: (rows, heads, head_dim), heads and head_dim contiguous, rows x_stride apart;
// cos, sin: (rows, 1, head_dim) contiguous, the factors of each row's position.
void rope(float* out, const float* x, int64_t x_stride, const float* cos, const float* sin,
          int64_t rows, int64_t heads, int64_t head_dim, int num_threads);

// k_cache and v_cache rows (row floats each) at slots[i] = k row i and v row i; a slot
// of -1 is skipped. k, v: rows k_stride / v_stride apart.
void store_kv(float* k_cache, float* v_cache, const float* k, int64_t k_stride, const float* v,
              int64_t v_stride, const int64_t* slots, int64_t rows, int64_t row);

}  // namespace llm_engine
