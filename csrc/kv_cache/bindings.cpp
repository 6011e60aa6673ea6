// Python bindings of the KV-cache block manager (llm_engine._C.BlockManager).
//
// Exceptions seen from Python:
//   UnknownSequenceError (subclass of KeyError)  unknown sequence id, double free
//   ValueError                                   bad sizes / ids / positions / token ids
//   OutOfBlocksError (subclass of RuntimeError)  not enough free blocks
//   IndexError                                   block id out of range (ref_count)
//   TypeError                                    a non-integer where ids are expected
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kv_cache/block_manager.h"

namespace py = pybind11;

namespace llm_engine {
namespace {

// A 1-D run of integers read from a Python list/tuple or an integer numpy array.
// int32 (tokens) or int64 (ids, positions) contiguous arrays are read in place.
template <typename T>
class IntBuffer {
 public:
  IntBuffer(const py::handle& obj, const char* name) {
    if (py::isinstance<py::array>(obj)) {
      auto arr = py::reinterpret_borrow<py::array>(obj);
      const char kind = arr.dtype().kind();
      if (kind != 'i' && kind != 'u') {
        throw py::type_error(std::string(name) + " must hold integers, got dtype " +
                             std::string(py::str(arr.dtype())));
      }
      if (arr.ndim() != 1) {
        throw py::value_error(std::string(name) + " must be 1-D, got shape " +
                              std::string(py::str(obj.attr("shape"))));
      }
      if (py::isinstance<py::array_t<T, py::array::c_style>>(obj)) {  // native order and width
        keep_ = arr;
        data_ = static_cast<const T*>(arr.data());
        size_ = static_cast<size_t>(arr.shape(0));
        return;
      }
      auto wide = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
      if (!wide) throw py::error_already_set();
      fill(wide.data(), static_cast<size_t>(wide.shape(0)), name);
      if (kind == 'u' && arr.itemsize() == 8) {
        for (size_t i = 0; i < size_; ++i) {
          if (wide.data()[i] < 0) out_of_range(name, i);
        }
      }
      return;
    }
    if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj)) {
      throw py::type_error(std::string(name) + " must be a sequence of ints or an integer array");
    }
    // PySequence_Fast gives lists and tuples' items without per-item calls.
    py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(obj.ptr(), name));
    if (!fast) throw py::error_already_set();
    const auto n = static_cast<size_t>(PySequence_Fast_GET_SIZE(fast.ptr()));
    PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
    storage_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      if (!PyLong_Check(items[i])) {
        throw py::type_error(std::string(name) + "[" + std::to_string(i) + "] is not an int");
      }
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
      if (overflow != 0 || v < static_cast<long long>(std::numeric_limits<T>::min()) ||
          v > static_cast<long long>(std::numeric_limits<T>::max())) {
        out_of_range(name, i);
      }
      storage_[i] = static_cast<T>(v);
    }
    data_ = storage_.data();
    size_ = n;
  }

  const T* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  void fill(const int64_t* src, size_t n, const char* name) {
    storage_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      if (src[i] < static_cast<int64_t>(std::numeric_limits<T>::min()) ||
          src[i] > static_cast<int64_t>(std::numeric_limits<T>::max())) {
        out_of_range(name, i);
      }
      storage_[i] = static_cast<T>(src[i]);
    }
    data_ = storage_.data();
    size_ = n;
  }

  [[noreturn]] static void out_of_range(const char* name, size_t i) {
    throw py::value_error(std::string(name) + "[" + std::to_string(i) +
                          "] does not fit in " + std::to_string(8 * sizeof(T)) + "-bit int");
  }

  py::object keep_;
  std::vector<T> storage_;
  const T* data_ = nullptr;
  size_t size_ = 0;
};

// Read-only numpy view of `v`'s current storage; the array holds a share of
// that storage, so it stays valid memory whatever later happens to `v`.
py::array_t<int32_t> view_of(const SharedVector<int32_t>& v) {
  using Storage = std::shared_ptr<const std::vector<int32_t>>;
  auto* keep = new Storage(v.share());
  py::capsule owner(keep, [](void* p) { delete static_cast<Storage*>(p); });
  py::array_t<int32_t> arr({static_cast<py::ssize_t>((*keep)->size())},
                           {static_cast<py::ssize_t>(sizeof(int32_t))}, (*keep)->data(), owner);
  py::detail::array_proxy(arr.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return arr;
}

void check_same_length(size_t a, size_t b, const char* name_a, const char* name_b) {
  if (a != b) {
    throw py::value_error(std::string(name_a) + " and " + name_b +
                          " must have the same length, got " + std::to_string(a) + " and " +
                          std::to_string(b));
  }
}

}  // namespace

void register_kv_cache(py::module_& m) {
  py::register_exception<UnknownSequenceError>(m, "UnknownSequenceError", PyExc_KeyError);
  py::register_exception<OutOfBlocksError>(m, "OutOfBlocksError", PyExc_RuntimeError);

  py::class_<BlockManager>(m, "BlockManager", R"doc(
Paged KV-cache block manager with prefix caching and copy-on-write.

The cache has ``num_blocks`` blocks of ``block_size`` token slots; slot
``block_id * block_size + offset`` holds one token's K/V. Each sequence owns a
block table covering all of its tokens. Full blocks whose tokens a step has
computed (see ``prepare_step``) are registered for prefix caching under a hash
chained over the parent block's hash and the block's token ids; a hit is also
checked against the stored token ids. Registered blocks with no owner stay
cached in an LRU list until evicted.

Errors: ``UnknownSequenceError`` (a ``KeyError``) for an unknown id or a double
free; ``ValueError`` for bad sizes, negative token ids, an id already in use,
out-of-range positions, duplicate ids in a batch; ``OutOfBlocksError`` (a
``RuntimeError``) when the blocks do not suffice. A failed call changes nothing.
)doc")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = true)
      .def(
          "allocate",
          [](BlockManager& bm, int64_t seq_id, const py::object& token_ids) {
            IntBuffer<int32_t> tokens(token_ids, "token_ids");
            return bm.allocate(seq_id, tokens.data(), tokens.size());
          },
          py::arg("seq_id"), py::arg("token_ids"),
          "Reserve blocks for a new sequence's prompt (list or int array of token ids).\n"
          "Returns the number of leading tokens already cached: whole blocks, at most\n"
          "len(token_ids) - 1. Raises OutOfBlocksError if it does not fit.")
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"),
           "Whether a prompt of num_tokens tokens fits without prefix hits.")
      .def(
          "can_allocate_tokens",
          [](const BlockManager& bm, const py::object& token_ids) {
            IntBuffer<int32_t> tokens(token_ids, "token_ids");
            return bm.can_allocate_tokens(tokens.data(), tokens.size());
          },
          py::arg("token_ids"), "Whether allocate(token_ids) would succeed now (counts prefix hits).")
      .def(
          "num_cached_tokens",
          [](const BlockManager& bm, const py::object& token_ids) {
            IntBuffer<int32_t> tokens(token_ids, "token_ids");
            return bm.num_cached_tokens(tokens.data(), tokens.size());
          },
          py::arg("token_ids"), "The cached-prefix length allocate(token_ids) would return now.")
      .def("append_token", &BlockManager::append_token, py::arg("seq_id"), py::arg("token_id"),
           "Append one token; returns its slot. Takes a new block when the last is full;\n"
           "copies-on-write (see take_pending_copies) when the last block is shared.")
      .def(
          "append_tokens",
          [](BlockManager& bm, const py::object& seq_ids, const py::object& token_ids) {
            IntBuffer<int64_t> ids(seq_ids, "seq_ids");
            IntBuffer<int32_t> tokens(token_ids, "token_ids");
            check_same_length(ids.size(), tokens.size(), "seq_ids", "token_ids");
            py::array_t<int64_t> slots(static_cast<py::ssize_t>(ids.size()));
            bm.append_tokens(ids.data(), tokens.data(), ids.size(), slots.mutable_data());
            return slots;
          },
          py::arg("seq_ids"), py::arg("token_ids"),
          "Batched append_token (one token per distinct sequence). Returns int64 slots (n,).\n"
          "All-or-nothing: raises before changing anything if an id is unknown or repeated\n"
          "or the blocks needed are not free.")
      .def(
          "num_blocks_to_append",
          [](const BlockManager& bm, const py::object& seq_ids) {
            IntBuffer<int64_t> ids(seq_ids, "seq_ids");
            return bm.num_blocks_to_append(ids.data(), ids.size());
          },
          py::arg("seq_ids"),
          "New blocks append_tokens(seq_ids, ...) would take now (ids distinct); a scheduler\n"
          "preempts sequences until this is <= num_free_blocks.")
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"),
           "Whether append_token(seq_id, ...) would find the block it needs.")
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"),
           "The child shares all the parent's blocks (reference counted) and copies its tokens.")
      .def("free", &BlockManager::free, py::arg("seq_id"),
           "Release the sequence's blocks; registered blocks stay cached until evicted.")
      .def("free_prefix_blocks", &BlockManager::free_prefix_blocks, py::arg("seq_id"),
           py::arg("num_blocks"),
           "Release the sequence's first num_blocks blocks (sliding-window attention: they\n"
           "lie before every future query's window). Their block-table entries become -1, so\n"
           "logical block i still covers positions [i * block_size, (i + 1) * block_size);\n"
           "a shared block only loses this sequence's reference, a cached one stays in the\n"
           "prefix cache's LRU. num_blocks must lie in [0, num_tokens // block_size] (full\n"
           "blocks only; ValueError otherwise). Returns how many blocks were released now.")
      .def("num_released_blocks", &BlockManager::num_released_blocks, py::arg("seq_id"),
           "Leading blocks of the sequence released by free_prefix_blocks (-1 in its table).")
      .def(
          "block_table",
          [](const BlockManager& bm, int64_t seq_id) { return view_of(bm.block_table(seq_id)); },
          py::arg("seq_id"),
          "The sequence's block ids as a read-only int32 numpy array viewing the manager's\n"
          "buffer (no copy). It shows the sequence's table until the next call that changes\n"
          "this sequence (append_token(s), free); after that it may be stale (old or new\n"
          "contents) but stays valid memory. Copy it to keep a snapshot.")
      .def(
          "token_ids",
          [](const BlockManager& bm, int64_t seq_id) { return view_of(bm.token_ids(seq_id)); },
          py::arg("seq_id"),
          "The sequence's token ids as a read-only int32 numpy view; same lifetime as block_table.")
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("take_pending_copies", &BlockManager::take_pending_copies,
           "Copy-on-write copies recorded since the last call, as [(src_block, dst_block)].\n"
           "Copy the K/V of src into dst before the next forward.")
      .def(
          "prepare_step",
          [](BlockManager& bm, const py::object& seq_ids, const py::object& starts,
             const py::object& ends, const py::object& max_blocks) {
            IntBuffer<int64_t> ids(seq_ids, "seq_ids");
            IntBuffer<int64_t> st(starts, "starts");
            IntBuffer<int64_t> en(ends, "ends");
            check_same_length(ids.size(), st.size(), "seq_ids", "starts");
            check_same_length(ids.size(), en.size(), "seq_ids", "ends");
            const StepPlan plan = bm.plan_step(ids.data(), st.data(), en.data(), ids.size());
            const int64_t width = max_blocks.is_none() ? plan.max_blocks : max_blocks.cast<int64_t>();
            if (width < plan.max_blocks) {
              throw py::value_error("prepare_step: max_blocks = " + std::to_string(width) +
                                    " is smaller than the " + std::to_string(plan.max_blocks) +
                                    " blocks this step needs");
            }
            const auto n = static_cast<py::ssize_t>(ids.size());
            py::array_t<int64_t> slot_mapping(static_cast<py::ssize_t>(plan.num_tokens));
            py::array_t<int32_t> block_tables({n, static_cast<py::ssize_t>(width)});
            py::array_t<int32_t> context_lens(n);
            bm.fill_step(ids.data(), st.data(), en.data(), ids.size(), width,
                         slot_mapping.mutable_data(), block_tables.mutable_data(),
                         context_lens.mutable_data());
            return py::make_tuple(slot_mapping, block_tables, context_lens);
          },
          py::arg("seq_ids"), py::arg("starts"), py::arg("ends"), py::arg("max_blocks") = py::none(),
          R"doc(
Attention metadata for one step that computes positions [starts[i], ends[i]) of
each (distinct) seq_ids[i]: a prefill chunk, or one decode token (end - 1, end).

Returns ``(slot_mapping, block_tables, context_lens)``:
  slot_mapping  int64 (sum(ends - starts),)  slot of each computed position, in batch order
  block_tables  int32 (len(seq_ids), max_blocks)  padded with -1; max_blocks defaults
                to ceil(max(ends) / block_size), a larger fixed width may be passed;
                blocks released by free_prefix_blocks are -1 (a computed position
                may not lie in one: ValueError)
  context_lens  int32 (len(seq_ids),)  = ends
Full blocks completed by this step are registered for prefix caching (their K/V
is written in this step's forward, before any later request can hit them).
)doc")
      .def("__repr__",
           [](const BlockManager& bm) {
             return "BlockManager(num_blocks=" + std::to_string(bm.num_blocks()) +
                    ", block_size=" + std::to_string(bm.block_size()) +
                    ", free=" + std::to_string(bm.num_free_blocks()) +
                    ", cached=" + std::to_string(bm.num_evictable_blocks()) +
                    ", sequences=" + std::to_string(bm.num_sequences()) + ")";
           })
      .def("ref_count", &BlockManager::ref_count, py::arg("block_id"),
           "Number of sequences holding block_id (IndexError if out of range).")
      .def("__contains__", &BlockManager::contains, py::arg("seq_id"))
      .def("__len__", &BlockManager::num_sequences, "Number of live sequences.")
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("enable_prefix_caching", &BlockManager::prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks,
                             "Blocks a new request can take (free + evictable cached).")
      .def_property_readonly("num_evictable_blocks", &BlockManager::num_evictable_blocks,
                             "Cached blocks no sequence holds (counted in num_free_blocks).")
      .def_property_readonly("usage", &BlockManager::usage,
                             "Fraction of blocks held by sequences, 1 - free/total.")
      .def_property_readonly("prefix_queries", &BlockManager::prefix_queries,
                             "Prompt tokens looked up in the prefix cache (allocate calls).")
      .def_property_readonly("prefix_hits", &BlockManager::prefix_hits,
                             "Prompt tokens served from the prefix cache.");
}

}  // namespace llm_engine
