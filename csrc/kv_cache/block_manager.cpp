#include "kv_cache/block_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace llm_engine {

namespace {

constexpr uint64_t kRootHash = 0x84222325cbf29ce4ULL;  // parent hash of a sequence's first block
constexpr uint64_t kLaneSeed = 0x9e3779b97f4a7c15ULL;
constexpr uint64_t kMulA = 0x9fb21c651e98df25ULL;
constexpr uint64_t kMulB = 0xc2b2ae3d27d4eb4fULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t pack(int32_t lo, int32_t hi) {
  return static_cast<uint64_t>(static_cast<uint32_t>(lo)) |
         (static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32);
}

// splitmix64 finaliser: spreads every input bit over the whole word.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

std::string seq_str(int64_t seq_id) { return "sequence id " + std::to_string(seq_id); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int32_t checked_token(int64_t token) {
  if (token < 0 || token > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("token id " + std::to_string(token) +
                                " is out of range [0, 2^31)");
  }
  return static_cast<int32_t>(token);
}

BlockHashTable::BlockHashTable(size_t max_entries) {
  size_t capacity = 16;
  while (capacity < 2 * max_entries) capacity *= 2;
  keys_.assign(capacity, 0);
  blocks_.assign(capacity, -1);
  mask_ = capacity - 1;
}

int32_t BlockHashTable::find(uint64_t key) const {
  for (size_t i = home(key);; i = (i + 1) & mask_) {
    if (blocks_[i] < 0) return -1;
    if (keys_[i] == key) return blocks_[i];
  }
}

bool BlockHashTable::insert(uint64_t key, int32_t block) {
  size_t i = home(key);
  for (; blocks_[i] >= 0; i = (i + 1) & mask_) {
    if (keys_[i] == key) return false;
  }
  if (2 * (size_ + 1) > keys_.size()) throw std::logic_error("BlockHashTable: over capacity");
  keys_[i] = key;
  blocks_[i] = block;
  ++size_;
  return true;
}

void BlockHashTable::erase(uint64_t key) {
  size_t hole = home(key);
  while (keys_[hole] != key || blocks_[hole] < 0) {
    if (blocks_[hole] < 0) throw std::logic_error("BlockHashTable: erasing a missing key");
    hole = (hole + 1) & mask_;
  }
  // Backward shift: move later entries of the probe run into the hole unless
  // their home slot lies cyclically in (hole, j], where they must stay.
  for (size_t j = (hole + 1) & mask_; blocks_[j] >= 0; j = (j + 1) & mask_) {
    const size_t h = home(keys_[j]);
    const bool stays = hole < j ? (hole < h && h <= j) : (hole < h || h <= j);
    if (!stays) {
      keys_[hole] = keys_[j];
      blocks_[hole] = blocks_[j];
      hole = j;
    }
  }
  blocks_[hole] = -1;
  --size_;
}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size),
      enable_prefix_caching_(enable_prefix_caching),
      cached_(enable_prefix_caching && num_blocks > 0 && num_blocks < (int64_t{1} << 31)
                  ? static_cast<size_t>(num_blocks)
                  : 0) {
  if (num_blocks <= 0 || num_blocks >= std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31 - 1), got " +
                                std::to_string(num_blocks));
  }
  if (block_size <= 0 || block_size > (1 << 20)) {
    throw std::invalid_argument("block_size must be in [1, 2^20], got " +
                                std::to_string(block_size));
  }
  const auto nb = static_cast<size_t>(num_blocks);
  ref_counts_.assign(nb, 0);
  free_stack_.resize(nb);
  // Block 0 is handed out first: the stack's back is the next block to take.
  for (size_t i = 0; i < nb; ++i) free_stack_[i] = static_cast<int32_t>(nb - 1 - i);
  lru_prev_.assign(nb + 1, static_cast<int32_t>(nb));
  lru_next_.assign(nb + 1, static_cast<int32_t>(nb));
  if (enable_prefix_caching_) {
    block_hash_.assign(nb, 0);
    registered_.assign(nb, 0);
    block_tokens_.assign(nb * static_cast<size_t>(block_size), 0);
  }
}

BlockManager::Sequence& BlockManager::get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequenceError("unknown " + seq_str(seq_id));
  return it->second;
}

const BlockManager::Sequence& BlockManager::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequenceError("unknown " + seq_str(seq_id));
  return it->second;
}

uint64_t BlockManager::hash_block(uint64_t parent, const int32_t* tokens) const {
  // Two independent multiply-rotate lanes over pairs of tokens (short
  // dependency chains), folded with the parent's hash by the final mix.
  uint64_t a = mix64(parent);
  uint64_t b = a ^ kLaneSeed;
  int64_t i = 0;
  for (; i + 4 <= block_size_; i += 4) {
    a = rotl((a ^ pack(tokens[i], tokens[i + 1])) * kMulA, 29);
    b = rotl((b ^ pack(tokens[i + 2], tokens[i + 3])) * kMulB, 31);
  }
  for (; i < block_size_; ++i) a = rotl((a ^ static_cast<uint32_t>(tokens[i])) * kMulA, 29);
  return mix64(a ^ rotl(b, 17));
}

BlockManager::PrefixMatch BlockManager::match_prefix(const int32_t* tokens, size_t n) const {
  PrefixMatch match;
  match.chain_hash = kRootHash;
  if (!enable_prefix_caching_ || n == 0) return match;
  const size_t bs = static_cast<size_t>(block_size_);
  const size_t max_blocks = (n - 1) / bs;  // always leave one token to compute
  for (size_t i = 0; i < max_blocks; ++i) {
    const int32_t* block_tokens = tokens + i * bs;
    const uint64_t h = hash_block(match.chain_hash, block_tokens);
    const int32_t b = cached_.find(h);
    if (b < 0) break;
    if (std::memcmp(&block_tokens_[static_cast<size_t>(b) * bs], block_tokens,
                    bs * sizeof(int32_t)) != 0) {
      break;  // hash collision: never serve another prefix's K/V
    }
    match.blocks.push_back(b);
    match.chain_hash = h;
    if (ref_counts_[static_cast<size_t>(b)] == 0) ++match.num_revived;
  }
  return match;
}

static void check_prompt(const int32_t* tokens, size_t n, const char* where) {
  if (n == 0) throw std::invalid_argument(std::string(where) + ": token_ids is empty");
  for (size_t i = 0; i < n; ++i) {
    if (tokens[i] < 0) {
      throw std::invalid_argument(std::string(where) + ": token_ids[" + std::to_string(i) +
                                  "] = " + std::to_string(tokens[i]) + " is negative");
    }
  }
}

int64_t BlockManager::allocate(int64_t seq_id, const int32_t* tokens, size_t n) {
  if (contains(seq_id)) {
    throw std::invalid_argument("allocate: " + seq_str(seq_id) + " is already allocated");
  }
  check_prompt(tokens, n, "allocate");
  PrefixMatch match = match_prefix(tokens, n);
  const int64_t total = ceil_div(static_cast<int64_t>(n), block_size_);
  const int64_t fresh = total - static_cast<int64_t>(match.blocks.size());
  const int64_t available = num_free_blocks() - match.num_revived;
  if (fresh > available) {
    throw OutOfBlocksError("allocate: " + seq_str(seq_id) + " needs " + std::to_string(fresh) +
                           " free blocks for " + std::to_string(n) + " tokens, " +
                           std::to_string(available) + " available");
  }
  Sequence seq;
  seq.tokens.assign(tokens, tokens + n);
  seq.blocks.reserve(static_cast<size_t>(total));
  for (int32_t b : match.blocks) {
    if (ref_counts_[static_cast<size_t>(b)] == 0) lru_remove(b);
    ++ref_counts_[static_cast<size_t>(b)];
    seq.blocks.push_back(b);
  }
  for (int64_t i = 0; i < fresh; ++i) seq.blocks.push_back(take_block());
  seq.num_hashed = static_cast<int64_t>(match.blocks.size());
  seq.chain_hash = match.chain_hash;
  const int64_t cached = seq.num_hashed * block_size_;
  if (enable_prefix_caching_) {
    prefix_queries_ += static_cast<int64_t>(n);
    prefix_hits_ += cached;
  }
  seqs_.emplace(seq_id, std::move(seq));
  return cached;
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens <= 0) {
    throw std::invalid_argument("can_allocate: num_tokens must be >= 1, got " +
                                std::to_string(num_tokens));
  }
  return ceil_div(num_tokens, block_size_) <= num_free_blocks();
}

bool BlockManager::can_allocate_tokens(const int32_t* tokens, size_t n) const {
  check_prompt(tokens, n, "can_allocate_tokens");
  const PrefixMatch match = match_prefix(tokens, n);
  const int64_t fresh =
      ceil_div(static_cast<int64_t>(n), block_size_) - static_cast<int64_t>(match.blocks.size());
  return fresh <= num_free_blocks() - match.num_revived;
}

int64_t BlockManager::num_cached_tokens(const int32_t* tokens, size_t n) const {
  check_prompt(tokens, n, "num_cached_tokens");
  return static_cast<int64_t>(match_prefix(tokens, n).blocks.size()) * block_size_;
}

bool BlockManager::needs_block(const Sequence& seq) const {
  const int64_t n = static_cast<int64_t>(seq.tokens.size());
  if (n % block_size_ == 0) return true;
  return ref_counts_[static_cast<size_t>(seq.blocks.back())] > 1;
}

int64_t BlockManager::append_checked(Sequence& seq, int32_t token) {
  const int64_t offset = static_cast<int64_t>(seq.tokens.size()) % block_size_;
  int32_t block;
  if (offset == 0) {
    block = take_block();
    seq.blocks.push_back(block);
  } else {
    const int32_t last = seq.blocks.back();
    if (ref_counts_[static_cast<size_t>(last)] > 1) {
      block = take_block();
      --ref_counts_[static_cast<size_t>(last)];  // stays >= 1: another sequence holds it
      pending_copies_.emplace_back(last, block);
      seq.blocks.back() = block;
    } else {
      block = last;
    }
  }
  seq.tokens.push_back(token);
  return static_cast<int64_t>(block) * block_size_ + offset;
}

int64_t BlockManager::append_token(int64_t seq_id, int64_t token) {
  Sequence& seq = get(seq_id);
  const int32_t t = checked_token(token);
  if (needs_block(seq) && num_free_blocks() == 0) {
    throw OutOfBlocksError("append_token: no free block for " + seq_str(seq_id));
  }
  return append_checked(seq, t);
}

bool BlockManager::can_append(int64_t seq_id) const {
  return !needs_block(get(seq_id)) || num_free_blocks() > 0;
}

int64_t BlockManager::num_blocks_to_append(const int64_t* seq_ids, size_t n) const {
  const uint64_t stamp = ++batch_stamp_;
  int64_t needed = 0;
  for (size_t i = 0; i < n; ++i) {
    const Sequence& seq = get(seq_ids[i]);
    if (seq.stamp == stamp) {
      throw std::invalid_argument("num_blocks_to_append: " + seq_str(seq_ids[i]) +
                                  " appears twice in seq_ids");
    }
    seq.stamp = stamp;
    needed += needs_block(seq) ? 1 : 0;
  }
  return needed;
}

void BlockManager::append_tokens(const int64_t* seq_ids, const int32_t* tokens, size_t n,
                                 int64_t* slots) {
  const uint64_t stamp = ++batch_stamp_;
  int64_t needed = 0;
  for (size_t i = 0; i < n; ++i) {
    Sequence& seq = get(seq_ids[i]);
    if (seq.stamp == stamp) {
      throw std::invalid_argument("append_tokens: " + seq_str(seq_ids[i]) +
                                  " appears twice in seq_ids");
    }
    seq.stamp = stamp;
    if (tokens[i] < 0) {
      throw std::invalid_argument("append_tokens: token_ids[" + std::to_string(i) + "] = " +
                                  std::to_string(tokens[i]) + " is negative");
    }
    needed += needs_block(seq) ? 1 : 0;
  }
  if (needed > num_free_blocks()) {
    throw OutOfBlocksError("append_tokens: the batch needs " + std::to_string(needed) +
                           " free blocks, " + std::to_string(num_free_blocks()) + " available");
  }
  for (size_t i = 0; i < n; ++i) slots[i] = append_checked(seqs_.find(seq_ids[i])->second, tokens[i]);
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Sequence& parent = get(parent_id);
  if (contains(child_id)) {
    throw std::invalid_argument("fork: child " + seq_str(child_id) + " is already allocated");
  }
  Sequence child = parent;
  child.stamp = 0;
  for (int32_t b : child.blocks) {
    if (b != kReleasedBlock) ++ref_counts_[static_cast<size_t>(b)];
  }
  seqs_.emplace(child_id, std::move(child));
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw UnknownSequenceError("free: unknown " + seq_str(seq_id) + " (never allocated or already freed)");
  }
  const SharedVector<int32_t>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) {
    if (*b != kReleasedBlock) release_block(*b);
  }
  seqs_.erase(it);
}

int64_t BlockManager::free_prefix_blocks(int64_t seq_id, int64_t num_blocks) {
  Sequence& seq = get(seq_id);
  const int64_t full = static_cast<int64_t>(seq.tokens.size()) / block_size_;
  if (num_blocks < 0 || num_blocks > full) {
    throw std::invalid_argument("free_prefix_blocks: num_blocks = " + std::to_string(num_blocks) +
                                " must lie in [0, " + std::to_string(full) + "], the full blocks of " +
                                seq_str(seq_id));
  }
  const int64_t start = seq.released;
  for (int64_t i = num_blocks - 1; i >= start; --i) {
    int32_t& b = seq.blocks[static_cast<size_t>(i)];
    release_block(b);
    b = kReleasedBlock;
  }
  seq.released = std::max(start, num_blocks);
  return std::max<int64_t>(0, num_blocks - start);
}

const SharedVector<int32_t>& BlockManager::block_table(int64_t seq_id) const {
  return get(seq_id).blocks;
}

int64_t BlockManager::num_tokens(int64_t seq_id) const {
  return static_cast<int64_t>(get(seq_id).tokens.size());
}

const SharedVector<int32_t>& BlockManager::token_ids(int64_t seq_id) const {
  return get(seq_id).tokens;
}

std::vector<std::pair<int32_t, int32_t>> BlockManager::take_pending_copies() {
  std::vector<std::pair<int32_t, int32_t>> out;
  out.swap(pending_copies_);
  return out;
}

StepPlan BlockManager::plan_step(const int64_t* seq_ids, const int64_t* starts,
                                 const int64_t* ends, size_t n) const {
  const uint64_t stamp = ++batch_stamp_;
  StepPlan plan;
  for (size_t i = 0; i < n; ++i) {
    const Sequence& seq = get(seq_ids[i]);
    if (seq.stamp == stamp) {
      throw std::invalid_argument("prepare_step: " + seq_str(seq_ids[i]) +
                                  " appears twice in seq_ids");
    }
    seq.stamp = stamp;
    const int64_t len = static_cast<int64_t>(seq.tokens.size());
    if (starts[i] < 0 || starts[i] > ends[i] || ends[i] > len) {
      throw std::invalid_argument("prepare_step: positions [" + std::to_string(starts[i]) + ", " +
                                  std::to_string(ends[i]) + ") of " + seq_str(seq_ids[i]) +
                                  " are not within its " + std::to_string(len) + " tokens");
    }
    if (starts[i] < ends[i] && starts[i] < seq.released * block_size_) {
      throw std::invalid_argument("prepare_step: position " + std::to_string(starts[i]) + " of " +
                                  seq_str(seq_ids[i]) + " lies in one of its " +
                                  std::to_string(seq.released) + " released blocks");
    }
    plan.num_tokens += ends[i] - starts[i];
    plan.max_blocks = std::max(plan.max_blocks, ceil_div(ends[i], block_size_));
  }
  return plan;
}

void BlockManager::fill_step(const int64_t* seq_ids, const int64_t* starts, const int64_t* ends,
                             size_t n, int64_t max_blocks, int64_t* slot_mapping,
                             int32_t* block_tables, int32_t* context_lens) {
  const StepPlan plan = plan_step(seq_ids, starts, ends, n);
  if (max_blocks < plan.max_blocks) {
    throw std::invalid_argument("prepare_step: max_blocks = " + std::to_string(max_blocks) +
                                " is smaller than the " + std::to_string(plan.max_blocks) +
                                " blocks this step needs");
  }
  int64_t* slot = slot_mapping;
  for (size_t i = 0; i < n; ++i) {
    Sequence& seq = seqs_.find(seq_ids[i])->second;
    const int32_t* blocks = seq.blocks.data();
    for (int64_t p = starts[i]; p < ends[i]; ++p) {
      *slot++ = static_cast<int64_t>(blocks[p / block_size_]) * block_size_ + p % block_size_;
    }
    const int64_t used = ceil_div(ends[i], block_size_);
    int32_t* row = block_tables + static_cast<int64_t>(i) * max_blocks;
    std::copy(blocks, blocks + used, row);
    std::fill(row + used, row + max_blocks, -1);
    context_lens[i] = static_cast<int32_t>(ends[i]);
    register_full_blocks(seq, ends[i]);
  }
}

void BlockManager::register_full_blocks(Sequence& seq, int64_t computed_tokens) {
  if (!enable_prefix_caching_) return;
  const int64_t full = computed_tokens / block_size_;
  const size_t bs = static_cast<size_t>(block_size_);
  for (int64_t i = seq.num_hashed; i < full; ++i) {
    const int32_t* tokens = seq.tokens.data() + static_cast<size_t>(i) * bs;
    const uint64_t h = hash_block(seq.chain_hash, tokens);
    seq.chain_hash = h;
    const int32_t b = seq.blocks[static_cast<size_t>(i)];
    if (b == kReleasedBlock) continue;  // its K/V may already be reused: never register it
    const auto ub = static_cast<size_t>(b);
    // A block already registered keeps its entry; a hash already taken by an
    // identical block (or a colliding one) leaves this block unregistered.
    if (!registered_[ub] && cached_.insert(h, b)) {
      registered_[ub] = 1;
      block_hash_[ub] = h;
      std::memcpy(&block_tokens_[ub * bs], tokens, bs * sizeof(int32_t));
    }
  }
  seq.num_hashed = std::max(seq.num_hashed, full);
}

int32_t BlockManager::take_block() {
  int32_t b;
  if (!free_stack_.empty()) {
    b = free_stack_.back();
    free_stack_.pop_back();
  } else if (lru_size_ > 0) {
    b = lru_pop_front();
    const auto ub = static_cast<size_t>(b);
    cached_.erase(block_hash_[ub]);
    registered_[ub] = 0;
  } else {
    throw std::logic_error("take_block: no free block (callers check availability first)");
  }
  ref_counts_[static_cast<size_t>(b)] = 1;
  return b;
}

void BlockManager::release_block(int32_t block) {
  const auto ub = static_cast<size_t>(block);
  if (--ref_counts_[ub] > 0) return;
  if (enable_prefix_caching_ && registered_[ub]) {
    lru_push_back(block);
  } else {
    free_stack_.push_back(block);
  }
}

void BlockManager::lru_push_back(int32_t block) {
  const auto sentinel = static_cast<size_t>(num_blocks_);
  const int32_t last = lru_prev_[sentinel];
  lru_next_[static_cast<size_t>(last)] = block;
  lru_prev_[static_cast<size_t>(block)] = last;
  lru_next_[static_cast<size_t>(block)] = static_cast<int32_t>(sentinel);
  lru_prev_[sentinel] = block;
  ++lru_size_;
}

void BlockManager::lru_remove(int32_t block) {
  const auto ub = static_cast<size_t>(block);
  lru_next_[static_cast<size_t>(lru_prev_[ub])] = lru_next_[ub];
  lru_prev_[static_cast<size_t>(lru_next_[ub])] = lru_prev_[ub];
  --lru_size_;
}

int32_t BlockManager::lru_pop_front() {
  const int32_t block = lru_next_[static_cast<size_t>(num_blocks_)];
  lru_remove(block);
  return block;
}

double BlockManager::usage() const {
  return 1.0 - static_cast<double>(num_free_blocks()) / static_cast<double>(num_blocks_);
}

int32_t BlockManager::ref_count(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw std::out_of_range("block id " + std::to_string(block_id) + " is out of range [0, " +
                            std::to_string(num_blocks_) + ")");
  }
  return ref_counts_[static_cast<size_t>(block_id)];
}

}  // namespace llm_engine
