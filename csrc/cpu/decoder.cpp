#include "cpu/decoder.h"

#include <algorithm>
#include <vector>

#include "cpu/layer_ops.h"
#include "cpu/paged_decode.h"

namespace llm_engine {
namespace {

// out (tokens, p.out_features) = x (tokens, p.in_features) @ W^T + bias.
void project(const QuantProjection& p, const float* x, float* out, int64_t tokens, bool int8,
             int num_threads) {
  int64_t col = 0;
  for (const QuantPart& part : p.parts) {
    if (int8 && quant_matmul_int8_supported(part.type)) {
      quant_matmul_int8(out + col, p.out_features, x, part.blocks, part.type, tokens, part.rows,
                        p.in_features, num_threads, part.layout);
    } else {
      quant_matmul(out + col, p.out_features, x, part.blocks, part.type, tokens, part.rows,
                   p.in_features, num_threads, part.layout);
    }
    col += part.rows;
  }
  if (p.bias == nullptr) return;
  for (int64_t t = 0; t < tokens; ++t) {
    float* row = out + t * p.out_features;
    for (int64_t j = 0; j < p.out_features; ++j) row[j] += p.bias[j];
  }
}

// The RMSNorm of each head of `heads` heads per token, read from rows x_stride apart,
// written contiguously: out (tokens, heads, head_dim).
void norm_heads(float* out, const float* x, int64_t x_stride, const float* weight,
                int64_t tokens, int64_t heads, int64_t head_dim, float eps, int num_threads) {
  for (int64_t t = 0; t < tokens; ++t) {
    rms_norm(out + t * heads * head_dim, nullptr, x + t * x_stride, nullptr, weight, heads,
             head_dim, eps, num_threads);
  }
}

}  // namespace

void decoder_step(const std::vector<DecoderLayer>& layers, const DecoderDims& d, float* x,
                  float* residual, const float* cos, const float* sin, const int64_t* slots,
                  const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,
                  int64_t tokens, bool int8, int num_threads) {
  const int64_t q_width = d.heads * d.head_dim, kv_width = d.kv_heads * d.head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  std::vector<float> h(tokens * d.hidden), qkv(tokens * qkv_width), q(tokens * q_width),
      k(tokens * kv_width), normed(tokens * q_width), attn(tokens * q_width),
      gate_up(tokens * 2 * d.intermediate), act(tokens * d.intermediate);
  const DecodeShape shape{tokens, d.heads, d.kv_heads, d.head_dim, d.num_blocks, d.block_size,
                          max_blocks};
  for (size_t l = 0; l < layers.size(); ++l) {
    const DecoderLayer& L = layers[l];
    if (l == 0) {  // the embeddings are the residual stream's start
      rms_norm(h.data(), nullptr, x, nullptr, L.attn_norm, tokens, d.hidden, d.eps, num_threads);
      std::copy(x, x + tokens * d.hidden, residual);
    } else {
      rms_norm(h.data(), residual, x, residual, L.attn_norm, tokens, d.hidden, d.eps,
               num_threads);
    }
    project(L.qkv, h.data(), qkv.data(), tokens, int8, num_threads);
    const float* q_in = qkv.data();
    const float* k_in = qkv.data() + q_width;
    int64_t q_stride = qkv_width, k_stride = qkv_width;
    if (L.q_norm != nullptr) {  // q heads into `normed`, k heads into `k`, then rotated in place
      norm_heads(normed.data(), q_in, qkv_width, L.q_norm, tokens, d.heads, d.head_dim, d.eps,
                 num_threads);
      norm_heads(attn.data(), k_in, qkv_width, L.k_norm, tokens, d.kv_heads, d.head_dim, d.eps,
                 num_threads);
      q_in = normed.data(), q_stride = q_width;
      k_in = attn.data(), k_stride = kv_width;
    }
    rope(q.data(), q_in, q_stride, cos, sin, tokens, d.heads, d.head_dim, num_threads);
    rope(k.data(), k_in, k_stride, cos, sin, tokens, d.kv_heads, d.head_dim, num_threads);
    store_kv(L.k_cache, L.v_cache, k.data(), kv_width, qkv.data() + q_width + kv_width,
             qkv_width, slots, tokens, kv_width);
    paged_decode_attention(attn.data(), q.data(), L.k_cache, L.v_cache, block_tables,
                           context_lens, shape, d.scale, num_threads, L.window);
    project(L.o, attn.data(), x, tokens, int8, num_threads);
    rms_norm(h.data(), residual, x, residual, L.mlp_norm, tokens, d.hidden, d.eps, num_threads);
    project(L.gate_up, h.data(), gate_up.data(), tokens, int8, num_threads);
    silu_mul(act.data(), gate_up.data(), tokens, d.intermediate, num_threads);
    project(L.down, act.data(), x, tokens, int8, num_threads);
  }
}

}  // namespace llm_engine
