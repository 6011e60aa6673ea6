// Linear layers straight from GGUF-quantized weights on the CPU: out = x @ W^T, with W
// (n, k) stored as ggml blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), row by row, in the
// byte layout of GGUF files. Nothing is expanded to fp32 in memory: each block is
// dequantized in registers where it is used.
//
// Q8_0, Q4_0 and Q4_1 take the integer route: every 32-value block of an x row is
// quantized to int8 with one fp32 scale (round to nearest), and a weight block's dot
// product with it is an int8 x int8 (or uint4 x int8) sum scaled once per block, as in
// llama.cpp's q8 dot products (AVX2 when the CPU has it, the same integer math in
// plain C++ otherwise). The K-quants expand each 256-value super-block to fp32 on the
// stack and take fp32 dot products with the x rows.
//
// Arrays are row-major; out's rows may be out_stride floats apart (a column slice of a
// wider output). The caller has checked every shape (see bindings.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace llm_engine {

enum class QuantType : int { kQ8_0, kQ4_0, kQ4_1, kQ4_K, kQ5_K, kQ6_K };

struct QuantFormat {
  int64_t block;  // weights per block
  int64_t bytes;  // bytes per block
};

// The type named "q8_0", "q4_0", "q4_1", "q4_k", "q5_k" or "q6_k"; std::invalid_argument
// for any other name.
QuantType quant_type_from_name(const std::string& name);
QuantFormat quant_format(QuantType type);

// out (rows, k) fp32 = the dequantized weight of blocks (rows, k / block * bytes).
void quant_dequantize(float* out, const uint8_t* blocks, QuantType type, int64_t rows, int64_t k,
                      int num_threads);

// out (m, n), rows out_stride apart, = x (m, k) contiguous @ W^T with W (n, k) in blocks.
void quant_matmul(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                  QuantType type, int64_t m, int64_t n, int64_t k, int num_threads);

// out (m, k) = x (m, k) with every 32-value block rounded as the Q8_0 / Q4_0 / Q4_1 route
// of quant_matmul rounds it: q * d, q = round(x / d) in [-127, 127], d = max|x| / 127.
// A GEMM over these rows and the dequantized weight computes what quant_matmul does
// (up to the order of the sums), so many rows can take a fast fp32 GEMM and still give,
// row for row, the numbers a few rows get from quant_matmul. k % 32 == 0.
void quant_round_activations(float* out, const float* x, int64_t m, int64_t k, int num_threads);

}  // namespace llm_engine
