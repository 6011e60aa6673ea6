// A decode step through every decoder layer of a Llama-style model on the CPU, in fp32,
// in one call: per layer RMSNorm (residual add fused), the QKV projection, optional
// per-head RMSNorm of q and k (Qwen3), the rotary embedding, the store of the new K/V
// rows into the paged cache, decode attention over the cache, the output projection,
// RMSNorm, the SwiGLU MLP. The projections read GGUF-quantized blocks (quant_matmul.h).
//
// It runs the same kernels, in the same order, as the per-op path in Python
// (llm_engine.ops), so its results equal that path's; what it saves is the Python
// between them: a few hundred interpreter round trips per decode step.
//
// The caller has checked every shape, block id and cache slot (see bindings.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/quant_matmul.h"

namespace llm_engine {

// Rows [first row, first row + rows) of a projection's weight, quantized as type.
struct QuantPart {
  const uint8_t* blocks;  // (rows, k / block * block_bytes)
  QuantType type;
  QuantLayout layout;
  int64_t rows;
};

// out (tokens, out_features) = x (tokens, in_features) @ W^T + bias, W stacked from parts.
struct QuantProjection {
  std::vector<QuantPart> parts;
  int64_t in_features = 0;
  int64_t out_features = 0;
  const float* bias = nullptr;  // (out_features,) or nullptr
};

struct DecoderLayer {
  const float* attn_norm;  // (hidden,)
  const float* q_norm;     // (head_dim,) or nullptr
  const float* k_norm;     // (head_dim,) or nullptr
  QuantProjection qkv;     // hidden -> (heads + 2 kv_heads) * head_dim, [q | k | v]
  QuantProjection o;       // heads * head_dim -> hidden
  const float* mlp_norm;   // (hidden,)
  QuantProjection gate_up;  // hidden -> 2 * intermediate, [gate | up]
  QuantProjection down;     // intermediate -> hidden
  float* k_cache;           // (num_blocks, block_size, kv_heads, head_dim)
  float* v_cache;
  int64_t window;  // > 0: attend to the last `window` positions only; 0: to all
};

struct DecoderDims {
  int64_t hidden;
  int64_t heads;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t intermediate;
  int64_t num_blocks;
  int64_t block_size;
  float eps;    // of every RMSNorm
  float scale;  // softmax scale
};

// One decode step of `tokens` sequences (one new token each) through `layers`.
// x: (tokens, hidden), the token embeddings on entry, the last layer's MLP output on
// return; residual: (tokens, hidden), written: the residual stream that the last MLP
// output is to be added to (the model's final norm takes both). cos, sin: (tokens,
// head_dim), each token's rotary factors (sign folded into sin, as rope() takes them);
// slots: (tokens,) cache slots of the new K/V rows (-1: skip); block_tables: (tokens,
// max_blocks); context_lens: (tokens,), the new token included. int8_activations: the
// projections whose type quant_matmul_int8 takes go through it.
void decoder_step(const std::vector<DecoderLayer>& layers, const DecoderDims& dims, float* x,
                  float* residual, const float* cos, const float* sin, const int64_t* slots,
                  const int32_t* block_tables, int64_t max_blocks, const int32_t* context_lens,
                  int64_t tokens, bool int8_activations, int num_threads);

}  // namespace llm_engine
