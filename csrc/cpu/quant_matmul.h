// Linear layers straight from GGUF-quantized weights on the CPU: out = x @ W^T, with W
// (n, k) stored as ggml blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), row by row, in the
// byte layout of GGUF files. Nothing is expanded to fp32 in memory: each block is
// dequantized in registers where it is used.
//
// Two routes for Q8_0, Q4_0 and Q4_1:
// - quant_matmul keeps x in fp32: each block's 32 integer levels are expanded to fp32 in
//   registers (AVX2 when the CPU has it, plain C++ otherwise), dotted with up to 4 x rows,
//   and scaled once per block. A row's result moves smoothly with its input.
// - quant_matmul_int8 rounds each x row to int8 per 32-value block first, as llama.cpp
//   does (its Q8_0 / Q8_1 activations), then takes integer dot products (AVX2 maddubs +
//   madd) and one fma per block with the product of the two scales: fewer instructions
//   per weight, at the cost of x's rounding (at most half a step, max|x| / 254, per
//   value), which makes a result jump with tiny changes of x. Its AVX2 and plain C++
//   paths agree bit for bit; setting LLM_ENGINE_QUANT_GENERIC in the environment before
//   the first call forces the plain one (for tests).
// The K-quants expand each 256-value super-block to fp32 on the stack and take fp32 dot
// products with the x rows.
//
// A weight's blocks come in one of two layouts (QuantLayout):
// - kRows: GGUF's, each weight row's blocks in turn (all types);
// - kRows8 (Q8_0, Q4_0, Q4_1): the rows in groups of 8, any last n % 8 rows after them in
//   kRows. A group holds, block by block, one record of its 8 rows' blocks: their 8 fp16
//   scales d, for Q4_1 their 8 fp16 offsets m, then their level bytes in 32-byte chunks,
//   chunk c holding bytes 4c .. 4c + 3 of each row's levels (16 bytes of nibbles, level l
//   low and l + 16 high; or Q8_0's 32 int8 levels), row after row. A group takes the
//   bytes its 8 rows took, so whole groups sliced off a kRows8 weight are kRows8 too.
//   One load brings 8 rows' scales, one a chunk of 8 rows' levels: the kernels keep a
//   vector lane per weight row, with no horizontal sums and no gathers, and expand each
//   chunk once for several x rows.
//
// Arrays are row-major; out's rows may be out_stride floats apart (a column slice of a
// wider output). The caller has checked every shape (see bindings.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace llm_engine {

enum class QuantType : int { kQ8_0, kQ4_0, kQ4_1, kQ4_K, kQ5_K, kQ6_K };
enum class QuantLayout : int { kRows, kRows8 };

struct QuantFormat {
  int64_t block;  // weights per block
  int64_t bytes;  // bytes per block
};

// The type named "q8_0", "q4_0", "q4_1", "q4_k", "q5_k" or "q6_k"; std::invalid_argument
// for any other name.
QuantType quant_type_from_name(const std::string& name);
QuantFormat quant_format(QuantType type);

// Whether blocks of this type can be in kRows8.
bool quant_rows8_supported(QuantType type);
// out = the blocks (rows, k / block * bytes) of a weight in kRows moved into kRows8
// (to_rows8), or back. Both the same size; they must not overlap.
void quant_relayout(uint8_t* out, const uint8_t* blocks, QuantType type, int64_t rows,
                    int64_t k, bool to_rows8);

// out (rows, k) fp32 = the dequantized weight of blocks (rows, k / block * bytes).
void quant_dequantize(float* out, const uint8_t* blocks, QuantType type, int64_t rows, int64_t k,
                      int num_threads, QuantLayout layout = QuantLayout::kRows);

// out (m, n), rows out_stride apart, = x (m, k) contiguous @ W^T with W (n, k) in blocks.
void quant_matmul(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                  QuantType type, int64_t m, int64_t n, int64_t k, int num_threads,
                  QuantLayout layout = QuantLayout::kRows);

// Whether quant_matmul_int8 takes weights of this type.
bool quant_matmul_int8_supported(QuantType type);
// out (m, n), rows out_stride apart, = x (m, k) @ W^T like quant_matmul, but with each row of
// x first rounded to int8 per block (llama.cpp's activation quantization), then integer dot
// products. A row's result depends on that row alone (batch-invariant).
void quant_matmul_int8(float* out, int64_t out_stride, const float* x, const uint8_t* w,
                       QuantType type, int64_t m, int64_t n, int64_t k, int num_threads,
                       QuantLayout layout = QuantLayout::kRows);

}  // namespace llm_engine
