// Host-side KV-cache block manager: which fixed-size block of the paged cache
// holds which tokens of which sequence.
//
// Plain C++17, no torch and no Python: the manager deals in sequence ids, token
// ids, block ids and int32 block tables. Python bindings live in bindings.cpp.
//
// Model
// -----
// The cache has `num_blocks` blocks of `block_size` token slots. Slot
// `block_id * block_size + offset` holds the K/V of one token. A sequence owns
// an ordered list of blocks (its block table) covering all of its tokens.
// Blocks are reference counted: `fork` shares every block of the parent with the
// child, and a sequence that appends into a shared, partly filled block first
// copies it (copy-on-write; the engine performs the recorded K/V copy).
//
// Prefix caching: a full block whose tokens have been computed is registered
// under a hash chained over its parent block's hash and its own token ids. A new
// prompt whose leading full blocks match registered blocks (hash AND stored
// token ids, so a hash collision can never serve wrong K/V) reuses them. A
// registered block whose reference count drops to zero is not wiped: it waits in
// an LRU list of evictable blocks and is either revived by a later hit or
// evicted (least recently used first, O(1)) when a fresh block is needed.
//
// Sliding window: with attention over the last W positions only, a block that
// lies wholly before every future query's window is never read again.
// `free_prefix_blocks` releases a sequence's leading full blocks; their entries
// in its block table become kReleasedBlock (-1), so logical block i still holds
// positions [i * block_size, (i + 1) * block_size). The sequence keeps its token
// ids (prefix hashes chain over them) and may not compute a position in a
// released block again; attention kernels skip the released entries because
// they lie outside the window.
//
// Errors (every argument is checked; a failed call leaves the manager unchanged)
// - UnknownSequenceError: a sequence id that is not allocated (also a double free).
// - std::invalid_argument: bad sizes, negative token ids, an id already in use,
//   positions out of range, duplicate ids in a batch.
// - OutOfBlocksError: not enough free blocks for the request.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace llm_engine {

// Block-table entry of a block released by free_prefix_blocks.
constexpr int32_t kReleasedBlock = -1;

class UnknownSequenceError : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

class OutOfBlocksError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Sizes of the arrays `fill_step` writes, computed (and every argument checked)
// by `plan_step`.
struct StepPlan {
  int64_t num_tokens = 0;  // sum of (end - start) over the batch
  int64_t max_blocks = 0;  // widest block table needed, ceil(max end / block_size)
};

// A token id as stored by the manager: checks 0 <= token < 2^31.
int32_t checked_token(int64_t token);

// A vector whose storage can outlive it, for zero-copy views (numpy arrays).
// A view holds a share of the storage (`share()`); growth moves the elements
// to new storage instead of reallocating in place, and copying a SharedVector
// copies the elements. So a view never dangles: after the vector changes, the
// view shows either the new contents (changes in place) or the contents at
// the time of the move (growth, destruction).
template <typename T>
class SharedVector {
 public:
  SharedVector() : data_(std::make_shared<std::vector<T>>()) {}
  SharedVector(const SharedVector& other) : data_(std::make_shared<std::vector<T>>(*other.data_)) {}
  SharedVector& operator=(const SharedVector& other) {
    data_ = std::make_shared<std::vector<T>>(*other.data_);
    return *this;
  }
  SharedVector(SharedVector&&) noexcept = default;
  SharedVector& operator=(SharedVector&&) noexcept = default;

  void assign(const T* first, const T* last) {
    data_ = std::make_shared<std::vector<T>>(first, last);
  }
  void reserve(size_t capacity) {
    if (capacity > data_->capacity()) move_to(capacity);
  }
  void push_back(T value) {
    if (data_->size() == data_->capacity()) move_to(std::max<size_t>(8, 2 * data_->size()));
    data_->push_back(value);
  }
  size_t size() const { return data_->size(); }
  const T* data() const { return data_->data(); }
  T& operator[](size_t i) { return (*data_)[i]; }
  const T& operator[](size_t i) const { return (*data_)[i]; }
  T& back() { return data_->back(); }
  const T& back() const { return data_->back(); }
  typename std::vector<T>::const_iterator begin() const { return data_->begin(); }
  typename std::vector<T>::const_iterator end() const { return data_->end(); }
  typename std::vector<T>::const_reverse_iterator rbegin() const { return data_->rbegin(); }
  typename std::vector<T>::const_reverse_iterator rend() const { return data_->rend(); }
  std::shared_ptr<const std::vector<T>> share() const { return data_; }

 private:
  void move_to(size_t capacity) {
    auto next = std::make_shared<std::vector<T>>();
    next->reserve(capacity);
    next->insert(next->end(), data_->begin(), data_->end());
    data_ = std::move(next);
  }

  std::shared_ptr<std::vector<T>> data_;
};

// Open-addressing hash table from a block's chained hash to its block id:
// linear probing over a power-of-two array at most half full (it holds at
// most `max_entries`), deletion by backward shift (no tombstones). Keys are
// already well-mixed hashes, so their low bits pick the home slot.
class BlockHashTable {
 public:
  explicit BlockHashTable(size_t max_entries);
  // The block registered under `key`, or -1.
  int32_t find(uint64_t key) const;
  // Registers block under key; false (and no change) if key is present.
  bool insert(uint64_t key, int32_t block);
  // Removes key, which must be present.
  void erase(uint64_t key);
  size_t size() const { return size_; }

 private:
  size_t home(uint64_t key) const { return static_cast<size_t>(key) & mask_; }

  std::vector<uint64_t> keys_;
  std::vector<int32_t> blocks_;  // -1: empty slot
  size_t mask_ = 0;
  size_t size_ = 0;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching);

  // Reserves blocks for a new sequence holding `tokens` (n >= 1 token ids, each in
  // [0, 2^31)). Returns the number of leading tokens whose K/V is already cached:
  // a multiple of block_size, and at most n - 1 so one token is always computed.
  int64_t allocate(int64_t seq_id, const int32_t* tokens, size_t n);
  // Whether a prompt of `num_tokens` fits without any prefix hit.
  bool can_allocate(int64_t num_tokens) const;
  // Whether `allocate` of this prompt would succeed now, counting prefix hits.
  bool can_allocate_tokens(const int32_t* tokens, size_t n) const;
  // Cached-prefix length `allocate` would return now (no state change).
  int64_t num_cached_tokens(const int32_t* tokens, size_t n) const;

  // Appends one token; returns its slot. Takes a fresh block when the last block
  // is full, copies-on-write when the last block is partly filled and shared.
  int64_t append_token(int64_t seq_id, int64_t token);
  // Whether `append_token(seq_id, ...)` would find the block it needs.
  bool can_append(int64_t seq_id) const;
  // New blocks append_tokens(seq_ids, ...) would take now (ids distinct): a
  // scheduler preempts until this is <= num_free_blocks().
  int64_t num_blocks_to_append(const int64_t* seq_ids, size_t n) const;
  // Appends tokens[i] to seq_ids[i] for every i (ids distinct), writing slots[i].
  // All-or-nothing: checks the ids and the blocks needed before changing anything.
  void append_tokens(const int64_t* seq_ids, const int32_t* tokens, size_t n, int64_t* slots);

  // The child shares all of the parent's blocks and copies its token ids.
  void fork(int64_t parent_id, int64_t child_id);
  // Releases the sequence's blocks (the last block first, so a cached prompt's
  // head stays in the LRU longest).
  void free(int64_t seq_id);
  // Releases the sequence's first num_blocks blocks that it still holds (the last
  // of them first) and marks them kReleasedBlock in its table; a shared block only
  // loses this sequence's reference, a registered one stays cached in the LRU.
  // num_blocks must lie in [0, num_tokens / block_size]: only full blocks go, never
  // the block the next token is written to. Returns how many blocks this call
  // released (0 when they were released already).
  int64_t free_prefix_blocks(int64_t seq_id, int64_t num_blocks);
  // Leading blocks of the sequence released by free_prefix_blocks.
  int64_t num_released_blocks(int64_t seq_id) const { return get(seq_id).released; }

  // The sequence's block ids / token ids. Views taken with share() stay valid
  // memory after the sequence changes or is freed (see SharedVector).
  const SharedVector<int32_t>& block_table(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  const SharedVector<int32_t>& token_ids(int64_t seq_id) const;
  bool contains(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

  // Copy-on-write copies recorded since the last call, as (src_block, dst_block).
  // The engine copies K/V of src into dst before the next forward.
  std::vector<std::pair<int32_t, int32_t>> take_pending_copies();
  size_t num_pending_copies() const { return pending_copies_.size(); }

  // A step computes positions [starts[i], ends[i]) of seq_ids[i] (a prefill chunk
  // or one decode token; ids distinct, 0 <= start <= end <= num_tokens, and no
  // computed position in a released block).
  // plan_step checks the batch and returns the output sizes; fill_step writes
  //   slot_mapping[num_tokens] (int64, the slot of each computed position, in order),
  //   block_tables[n, max_blocks] (int32, padded with -1; max_blocks >= plan's;
  //     released blocks are kReleasedBlock),
  //   context_lens[n] (int32, = ends[i]),
  // and registers the full blocks that this step completes for prefix caching.
  StepPlan plan_step(const int64_t* seq_ids, const int64_t* starts, const int64_t* ends,
                     size_t n) const;
  void fill_step(const int64_t* seq_ids, const int64_t* starts, const int64_t* ends, size_t n,
                 int64_t max_blocks, int64_t* slot_mapping, int32_t* block_tables,
                 int32_t* context_lens);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return enable_prefix_caching_; }
  // Blocks a new request can take: never-used/unregistered free blocks plus
  // evictable cached blocks.
  int64_t num_free_blocks() const {
    return static_cast<int64_t>(free_stack_.size()) + lru_size_;
  }
  // Cached blocks with reference count 0 (part of num_free_blocks).
  int64_t num_evictable_blocks() const { return lru_size_; }
  // Fraction of blocks held by sequences: 1 - num_free_blocks / num_blocks.
  double usage() const;
  // Prompt tokens looked up in the prefix cache / found there (token counts).
  int64_t prefix_queries() const { return prefix_queries_; }
  int64_t prefix_hits() const { return prefix_hits_; }
  int32_t ref_count(int64_t block_id) const;

 private:
  struct Sequence {
    SharedVector<int32_t> blocks;
    SharedVector<int32_t> tokens;
    uint64_t chain_hash = 0;  // hash of block num_hashed - 1 (seed when 0)
    int64_t num_hashed = 0;   // leading full blocks folded into chain_hash
    int64_t released = 0;     // leading blocks released (kReleasedBlock in blocks)
    // Id of the last batched call that saw this sequence (duplicate detection
    // only; not part of the manager's observable state).
    mutable uint64_t stamp = 0;
  };

  struct PrefixMatch {
    std::vector<int32_t> blocks;  // matched blocks, in order
    uint64_t chain_hash = 0;
    int64_t num_revived = 0;  // matched blocks currently evictable (ref 0)
  };

  Sequence& get(int64_t seq_id);
  const Sequence& get(int64_t seq_id) const;
  PrefixMatch match_prefix(const int32_t* tokens, size_t n) const;
  uint64_t hash_block(uint64_t parent, const int32_t* tokens) const;
  bool needs_block(const Sequence& seq) const;
  int32_t take_block();
  void release_block(int32_t block);
  void register_full_blocks(Sequence& seq, int64_t computed_tokens);
  int64_t append_checked(Sequence& seq, int32_t token);
  void lru_push_back(int32_t block);
  void lru_remove(int32_t block);
  int32_t lru_pop_front();

  int64_t num_blocks_;
  int64_t block_size_;
  bool enable_prefix_caching_;

  std::vector<int32_t> ref_counts_;
  std::vector<int32_t> free_stack_;  // ref 0, unregistered; popped from the back
  // Registered blocks: hash -> block, the block's hash and its token ids.
  BlockHashTable cached_;
  std::vector<uint64_t> block_hash_;
  std::vector<uint8_t> registered_;
  std::vector<int32_t> block_tokens_;  // num_blocks * block_size
  // Intrusive doubly linked LRU over evictable blocks; node num_blocks is the
  // sentinel, front (sentinel's next) is least recently used.
  std::vector<int32_t> lru_prev_;
  std::vector<int32_t> lru_next_;
  int64_t lru_size_ = 0;

  std::unordered_map<int64_t, Sequence> seqs_;
  std::vector<std::pair<int32_t, int32_t>> pending_copies_;
  mutable uint64_t batch_stamp_ = 0;
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
};

}  // namespace llm_engine
