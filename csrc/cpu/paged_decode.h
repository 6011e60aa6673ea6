// Decode attention over the paged KV cache on the CPU, in fp32.
//
// One query token per sequence attends over its context_len cached keys and
// values, which live in fixed-size blocks named by the sequence's block table.
// The kernel reads K/V straight from the cache blocks (no gathered copy). Work
// items are (sequence, chunk of 512 positions), spread over OpenMP threads: per
// item, one pass over its K rows for the scores of every head, a softmax, one pass
// over its V rows; a sequence's chunks are then combined through their softmax
// maxima and sums, so one long sequence still keeps every thread busy.
// Grouped-query attention: query head h reads kv head h / (heads / kv_heads).
#pragma once

#include <cstdint>

namespace llm_engine {

struct DecodeShape {
  int64_t num_seqs;
  int64_t heads;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t num_blocks;
  int64_t block_size;
  int64_t max_blocks;  // columns of block_tables
};

// out, q: (num_seqs, heads, head_dim); k_cache, v_cache: (num_blocks, block_size,
// kv_heads, head_dim); block_tables: (num_seqs, max_blocks); context_lens: (num_seqs,).
// All C-contiguous. The caller has checked every context length and every block id
// that the kernel reads (check_decode_inputs with the same window). A sequence with
// context length 0 gets zeros. Runs on up to num_threads threads (the calling thread
// included). window > 0: each query attends only to the last `window` positions of its
// context (a sliding window); 0: to all of them.
void paged_decode_attention(float* out, const float* q, const float* k_cache,
                            const float* v_cache, const int32_t* block_tables,
                            const int32_t* context_lens, const DecodeShape& shape, float scale,
                            int num_threads, int64_t window = 0);

// Throws std::invalid_argument naming the first bad context length or block id. Only
// the blocks the kernel reads are checked: with window > 0, those holding the last
// `window` positions of each context (entries before them, e.g. blocks a sliding-window
// engine released as -1, are never read).
void check_decode_inputs(const int32_t* block_tables, const int32_t* context_lens,
                         const DecodeShape& shape, int64_t window = 0);

}  // namespace llm_engine
