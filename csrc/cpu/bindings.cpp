// Python bindings of the CPU kernels: the decode attention
// (llm_engine._C.paged_decode_attention) and the per-token layer ops (rms_norm, silu_mul,
// rope, store_kv) and the quantized linear (quant_matmul, quant_dequantize).
//
// Arrays come from torch CPU tensors through .numpy() (zero-copy). Exceptions seen
// from Python: TypeError for a wrong dtype, layout or non-array argument; ValueError
// for inconsistent shapes, a context length out of range, or a block id or cache slot
// that is not in the cache.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/decoder.h"
#include "cpu/layer_ops.h"
#include "cpu/paged_decode.h"
#include "cpu/quant_matmul.h"

namespace py = pybind11;

namespace llm_engine {
namespace {

// TypeError naming the argument, what it must be and what it is.
[[noreturn]] void throw_not_array(const py::handle& obj, const char* name,
                                  const std::string& must_be) {
  throw py::type_error(std::string(name) + " must be " + must_be + ", got " +
                       std::string(py::str(py::type::handle_of(obj))) +
                       (py::isinstance<py::array>(obj)
                            ? " of dtype " + std::string(py::str(obj.attr("dtype")))
                            : ""));
}

void expect_ndim(const py::array& arr, const py::handle& obj, const char* name,
                 py::ssize_t ndim) {
  if (arr.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) +
                          " dimensions, got shape " + std::string(py::str(obj.attr("shape"))));
  }
}

template <typename T>
py::array_t<T> expect_array(const py::handle& obj, const char* name, const char* dtype,
                            py::ssize_t ndim) {
  if (!py::isinstance<py::array_t<T, py::array::c_style>>(obj)) {
    throw_not_array(obj, name, std::string("a C-contiguous ") + dtype + " array");
  }
  auto arr = py::reinterpret_borrow<py::array_t<T>>(obj);
  expect_ndim(arr, obj, name, ndim);
  return arr;
}

// An array whose rows may be apart (a slice of wider rows), and its row stride in
// elements.
template <typename T>
struct Rows {
  py::array_t<T> array;
  int64_t stride;
};

// Every dimension but the first must be contiguous inside a row.
template <typename T>
Rows<T> expect_rows(const py::handle& obj, const char* name, const char* dtype, py::ssize_t ndim) {
  if (!py::isinstance<py::array_t<T>>(obj)) {
    throw_not_array(obj, name, std::string("a ") + dtype + " array");
  }
  auto arr = py::reinterpret_borrow<py::array_t<T>>(obj);
  expect_ndim(arr, obj, name, ndim);
  constexpr auto item = static_cast<py::ssize_t>(sizeof(T));
  if (arr.size() == 0) return {arr, 0};  // nothing to read (numpy gives empty arrays any strides)
  py::ssize_t inner = item;
  for (py::ssize_t i = ndim - 1; i >= 1; --i) {
    if (arr.shape(i) > 1 && arr.strides(i) != inner) {
      throw py::type_error(std::string(name) + " must be contiguous within each row, got strides " +
                           std::string(py::str(obj.attr("strides"))));
    }
    inner *= arr.shape(i);
  }
  if (arr.shape(0) == 1) return {arr, inner / item};
  const py::ssize_t stride = arr.strides(0);
  if (stride < inner || stride % item != 0) {
    throw py::type_error(std::string(name) + " must have rows at least a row apart, got strides " +
                         std::string(py::str(obj.attr("strides"))));
  }
  return {arr, stride / item};
}

std::string shape_of(const py::handle& a) { return std::string(py::str(a.attr("shape"))); }

void expect_same_shape(const py::array& a, const char* a_name, const py::array& b,
                       const char* b_name) {
  bool same = a.ndim() == b.ndim();
  for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == b.shape(i);
  if (!same) {
    throw py::value_error(std::string(a_name) + " " + shape_of(a) + " must match " + b_name + " " +
                          shape_of(b));
  }
}

void expect_writeable(const py::array& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writeable");
}

void expect_threads(int num_threads) {
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
}

// Every slot_mapping entry a cache slot in [0, num_slots) or -1 (skip).
void expect_slots(const int64_t* slots, int64_t n, int64_t num_slots) {
  for (int64_t i = 0; i < n; ++i) {
    if (slots[i] < -1 || slots[i] >= num_slots) {
      throw py::value_error("slot_mapping[" + std::to_string(i) + "] = " +
                            std::to_string(slots[i]) + " is not a cache slot in [0, " +
                            std::to_string(num_slots) + ") nor -1 (skip)");
    }
  }
}

void decode(const py::handle& out_obj, const py::handle& q_obj, const py::handle& k_obj,
            const py::handle& v_obj, const py::handle& tables_obj, const py::handle& lens_obj,
            float scale, int num_threads, int64_t window) {
  auto out = expect_array<float>(out_obj, "out", "float32", 3);
  auto q = expect_array<float>(q_obj, "q", "float32", 3);
  auto k = expect_array<float>(k_obj, "k_cache", "float32", 4);
  auto v = expect_array<float>(v_obj, "v_cache", "float32", 4);
  auto tables = expect_array<int32_t>(tables_obj, "block_tables", "int32", 2);
  auto lens = expect_array<int32_t>(lens_obj, "context_lens", "int32", 1);
  const DecodeShape s{q.shape(0), q.shape(1), k.shape(2), q.shape(2),
                      k.shape(0), k.shape(1), tables.shape(1)};
  if (s.kv_heads <= 0 || s.heads % s.kv_heads != 0 || k.shape(3) != s.head_dim) {
    throw py::value_error("k_cache " + shape_of(k_obj) +
                          " must be (num_blocks, block_size, kv_heads, head_dim) with heads a "
                          "multiple of kv_heads and head_dim as in q " + shape_of(q_obj));
  }
  if (s.block_size <= 0) throw py::value_error("k_cache must have block_size > 0");
  expect_same_shape(v, "v_cache", k, "k_cache");
  expect_same_shape(out, "out", q, "q");
  if (tables.shape(0) != s.num_seqs || lens.shape(0) != s.num_seqs) {
    throw py::value_error("block_tables " + shape_of(tables_obj) + " and context_lens " +
                          shape_of(lens_obj) + " must have one row per sequence of q " +
                          shape_of(q_obj));
  }
  expect_writeable(out, "out");
  expect_threads(num_threads);
  if (window < 0) throw py::value_error("window must be >= 0 (0: no sliding window)");
  check_decode_inputs(tables.data(), lens.data(), s, window);  // invalid_argument -> ValueError
  float* out_data = out.mutable_data();
  py::gil_scoped_release release;
  paged_decode_attention(out_data, q.data(), k.data(), v.data(), tables.data(), lens.data(), s,
                         scale, num_threads, window);
}

void rms_norm_py(const py::handle& out_obj, const py::handle& residual_out_obj,
                 const py::handle& x_obj, const py::handle& residual_obj,
                 const py::handle& weight_obj, float eps, int num_threads) {
  auto out = expect_array<float>(out_obj, "out", "float32", 2);
  auto x = expect_array<float>(x_obj, "x", "float32", 2);
  auto weight = expect_array<float>(weight_obj, "weight", "float32", 1);
  expect_same_shape(out, "out", x, "x");
  expect_writeable(out, "out");
  if (weight.shape(0) != x.shape(1)) {
    throw py::value_error("weight " + shape_of(weight_obj) + " must have one entry per column of x " +
                          shape_of(x_obj));
  }
  if (residual_obj.is_none() != residual_out_obj.is_none()) {
    throw py::value_error("residual and residual_out must both be given or both be None");
  }
  const float* residual = nullptr;
  float* residual_out = nullptr;
  if (!residual_obj.is_none()) {
    auto r = expect_array<float>(residual_obj, "residual", "float32", 2);
    auto r_out = expect_array<float>(residual_out_obj, "residual_out", "float32", 2);
    expect_same_shape(r, "residual", x, "x");
    expect_same_shape(r_out, "residual_out", x, "x");
    expect_writeable(r_out, "residual_out");
    residual = r.data();
    residual_out = r_out.mutable_data();
  }
  if (!(eps >= 0.0f)) throw py::value_error("eps must be >= 0, got " + std::to_string(eps));
  expect_threads(num_threads);
  float* out_data = out.mutable_data();
  py::gil_scoped_release release;
  rms_norm(out_data, residual_out, x.data(), residual, weight.data(), x.shape(0), x.shape(1), eps,
           num_threads);
}

void silu_mul_py(const py::handle& out_obj, const py::handle& h_obj, int num_threads) {
  auto out = expect_array<float>(out_obj, "out", "float32", 2);
  auto h = expect_array<float>(h_obj, "h", "float32", 2);
  if (h.shape(1) % 2 != 0 || out.shape(0) != h.shape(0) || out.shape(1) * 2 != h.shape(1)) {
    throw py::value_error("h " + shape_of(h_obj) + " must be (rows, 2 * width) and out " +
                          shape_of(out_obj) + " (rows, width)");
  }
  expect_writeable(out, "out");
  expect_threads(num_threads);
  float* out_data = out.mutable_data();
  py::gil_scoped_release release;
  silu_mul(out_data, h.data(), h.shape(0), out.shape(1), num_threads);
}

void rope_py(const py::handle& out_obj, const py::handle& x_obj, const py::handle& cos_obj,
             const py::handle& sin_obj, int num_threads) {
  auto out = expect_array<float>(out_obj, "out", "float32", 3);
  const auto [x, x_stride] = expect_rows<float>(x_obj, "x", "float32", 3);
  auto cos = expect_array<float>(cos_obj, "cos", "float32", 3);
  auto sin = expect_array<float>(sin_obj, "sin", "float32", 3);
  expect_same_shape(out, "out", x, "x");
  expect_same_shape(sin, "sin", cos, "cos");
  if (x.shape(2) % 2 != 0 || cos.shape(0) != x.shape(0) || cos.shape(1) != 1 ||
      cos.shape(2) != x.shape(2)) {
    throw py::value_error("x " + shape_of(x_obj) + " must be (rows, heads, head_dim) with head_dim "
                          "even, and cos, sin " + shape_of(cos_obj) + " (rows, 1, head_dim)");
  }
  expect_writeable(out, "out");
  expect_threads(num_threads);
  // Each output half reads both input halves, so out must not overlap x.
  const float* x_begin = x.data();
  const float* x_end = x.size() == 0 ? x_begin
                                     : x_begin + (x.shape(0) - 1) * x_stride + x.shape(1) * x.shape(2);
  float* out_data = out.mutable_data();
  if (out.size() > 0 && out_data < x_end && x_begin < out_data + out.size()) {
    throw py::value_error("out must not overlap x");
  }
  py::gil_scoped_release release;
  rope(out_data, x.data(), x_stride, cos.data(), sin.data(), x.shape(0), x.shape(1), x.shape(2),
       num_threads);
}

void store_kv_py(const py::handle& k_cache_obj, const py::handle& v_cache_obj,
                 const py::handle& k_obj, const py::handle& v_obj, const py::handle& slots_obj) {
  auto k_cache = expect_array<float>(k_cache_obj, "k_cache", "float32", 4);
  auto v_cache = expect_array<float>(v_cache_obj, "v_cache", "float32", 4);
  const auto [k, k_stride] = expect_rows<float>(k_obj, "k", "float32", 3);
  const auto [v, v_stride] = expect_rows<float>(v_obj, "v", "float32", 3);
  auto slots = expect_array<int64_t>(slots_obj, "slot_mapping", "int64", 1);
  expect_same_shape(v_cache, "v_cache", k_cache, "k_cache");
  expect_same_shape(v, "v", k, "k");
  if (k.shape(1) != k_cache.shape(2) || k.shape(2) != k_cache.shape(3) ||
      slots.shape(0) != k.shape(0)) {
    throw py::value_error("k " + shape_of(k_obj) + " must be (tokens, kv_heads, head_dim) as in "
                          "k_cache " + shape_of(k_cache_obj) + ", with one slot_mapping entry per "
                          "token, got " + shape_of(slots_obj));
  }
  expect_writeable(k_cache, "k_cache");
  expect_writeable(v_cache, "v_cache");
  const int64_t* s = slots.data();
  expect_slots(s, slots.shape(0), k_cache.shape(0) * k_cache.shape(1));
  float* k_data = k_cache.mutable_data();
  float* v_data = v_cache.mutable_data();
  py::gil_scoped_release release;
  store_kv(k_data, v_data, k.data(), k_stride, v.data(), v_stride, s, k.shape(0),
           k.shape(1) * k.shape(2));
}

// The format of qtype, with k checked to be whole blocks and blocks (rows, row bytes) to
// hold them.
QuantFormat expect_blocks(const py::array_t<uint8_t>& w, const py::handle& w_obj, QuantType type,
                          const std::string& qtype, int64_t k, const char* k_from,
                          const std::string& blocks_name = "blocks") {
  const QuantFormat f = quant_format(type);
  if (k <= 0 || k % f.block != 0) {
    throw py::value_error(std::string(k_from) + " must be a positive multiple of the " + qtype +
                          " block size " + std::to_string(f.block) + ", got " + std::to_string(k));
  }
  if (w.shape(1) != k / f.block * f.bytes) {
    throw py::value_error(blocks_name + " " + shape_of(w_obj) + " must be (rows, " +
                          std::to_string(k / f.block * f.bytes) + ") for " + qtype + " with k = " +
                          std::to_string(k));
  }
  return f;
}

// The layout named "rows" or "rows8", checked to take blocks of type (qtype).
QuantLayout quant_layout_from_name(const std::string& layout, QuantType type,
                                   const std::string& qtype) {
  if (layout == "rows") return QuantLayout::kRows;
  if (layout != "rows8") {
    throw py::value_error("layout must be 'rows' or 'rows8', got '" + layout + "'");
  }
  if (!quant_rows8_supported(type)) {
    throw py::value_error("layout 'rows8' takes q8_0, q4_0 and q4_1 blocks, got " + qtype);
  }
  return QuantLayout::kRows8;
}

void quant_matmul_py(const py::handle& out_obj, const py::handle& x_obj,
                     const py::handle& blocks_obj, const std::string& qtype, int num_threads,
                     bool int8_activations, const std::string& layout_name) {
  auto [out, out_stride] = expect_rows<float>(out_obj, "out", "float32", 2);
  auto x = expect_array<float>(x_obj, "x", "float32", 2);
  auto w = expect_array<uint8_t>(blocks_obj, "blocks", "uint8", 2);
  const QuantType type = quant_type_from_name(qtype);  // std::invalid_argument -> ValueError
  if (int8_activations && !quant_matmul_int8_supported(type)) {
    throw py::value_error("int8_activations=True does not take " + qtype + " weights");
  }
  const QuantLayout layout = quant_layout_from_name(layout_name, type, qtype);
  const int64_t m = x.shape(0), k = x.shape(1), n = w.shape(0);
  expect_blocks(w, blocks_obj, type, qtype, k, "x's last dimension (k)");
  if (out.shape(0) != m || out.shape(1) != n) {
    throw py::value_error("out " + shape_of(out_obj) + " must be (rows of x, rows of blocks) = (" +
                          std::to_string(m) + ", " + std::to_string(n) + ")");
  }
  expect_writeable(out, "out");
  expect_threads(num_threads);
  float* out_data = out.mutable_data();
  const float* out_end = out.size() == 0 ? out_data : out_data + (m - 1) * out_stride + n;
  if (out.size() > 0 && x.size() > 0 && out_data < x.data() + x.size() && x.data() < out_end) {
    throw py::value_error("out must not overlap x");
  }
  py::gil_scoped_release release;
  if (int8_activations) {
    quant_matmul_int8(out_data, out_stride, x.data(), w.data(), type, m, n, k, num_threads,
                      layout);
  } else {
    quant_matmul(out_data, out_stride, x.data(), w.data(), type, m, n, k, num_threads, layout);
  }
}

void quant_dequantize_py(const py::handle& out_obj, const py::handle& blocks_obj,
                         const std::string& qtype, int num_threads,
                         const std::string& layout_name) {
  auto out = expect_array<float>(out_obj, "out", "float32", 2);
  auto w = expect_array<uint8_t>(blocks_obj, "blocks", "uint8", 2);
  const QuantType type = quant_type_from_name(qtype);
  const QuantLayout layout = quant_layout_from_name(layout_name, type, qtype);
  expect_blocks(w, blocks_obj, type, qtype, out.shape(1), "out's last dimension (k)");
  if (out.shape(0) != w.shape(0)) {
    throw py::value_error("out " + shape_of(out_obj) + " must have one row per row of blocks " +
                          shape_of(blocks_obj));
  }
  expect_writeable(out, "out");
  expect_threads(num_threads);
  float* out_data = out.mutable_data();
  py::gil_scoped_release release;
  quant_dequantize(out_data, w.data(), type, w.shape(0), out.shape(1), num_threads, layout);
}

void quant_relayout_py(const py::handle& out_obj, const py::handle& blocks_obj,
                       const std::string& qtype, int64_t k, bool to_rows8) {
  auto out = expect_array<uint8_t>(out_obj, "out", "uint8", 2);
  auto w = expect_array<uint8_t>(blocks_obj, "blocks", "uint8", 2);
  const QuantType type = quant_type_from_name(qtype);
  quant_layout_from_name("rows8", type, qtype);
  expect_blocks(w, blocks_obj, type, qtype, k, "k");
  expect_same_shape(out, "out", w, "blocks");
  expect_writeable(out, "out");
  uint8_t* out_data = out.mutable_data();
  if (out.size() > 0 && out_data < w.data() + w.size() && w.data() < out_data + out.size()) {
    throw py::value_error("out must not overlap blocks");
  }
  py::gil_scoped_release release;
  quant_relayout(out_data, w.data(), type, w.shape(0), k, to_rows8);
}

// The layers of a decode stack (decoder.h) over arrays it keeps alive: weights and caches
// are checked once, as each layer is added; a step checks only its own inputs.
class DecoderStack {
 public:
  DecoderStack(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim,
               int64_t intermediate, float eps, float scale)
      : dims_{hidden, heads, kv_heads, head_dim, intermediate, 0, 0, eps, scale} {
    if (hidden <= 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
        intermediate <= 0 || heads % kv_heads != 0) {
      throw py::value_error("DecoderStack needs positive sizes, an even head_dim and heads a "
                            "multiple of kv_heads");
    }
    if (!(eps >= 0.0f)) throw py::value_error("eps must be >= 0");
  }

  void add_layer(const py::handle& attn_norm, const py::list& qkv, const py::handle& qkv_bias,
                 const py::handle& q_norm, const py::handle& k_norm, const py::list& o,
                 const py::handle& mlp_norm, const py::list& gate_up, const py::list& down,
                 const py::handle& k_cache_obj, const py::handle& v_cache_obj, int64_t window) {
    const DecoderDims& d = dims_;
    const int64_t q_width = d.heads * d.head_dim, kv_width = d.kv_heads * d.head_dim;
    DecoderLayer L{};
    L.attn_norm = vector_of(attn_norm, "attn_norm", d.hidden);
    L.mlp_norm = vector_of(mlp_norm, "mlp_norm", d.hidden);
    if (q_norm.is_none() != k_norm.is_none()) {
      throw py::value_error("q_norm and k_norm must both be given or both be None");
    }
    L.q_norm = q_norm.is_none() ? nullptr : vector_of(q_norm, "q_norm", d.head_dim);
    L.k_norm = k_norm.is_none() ? nullptr : vector_of(k_norm, "k_norm", d.head_dim);
    L.qkv = projection(qkv, "qkv", d.hidden, q_width + 2 * kv_width);
    if (!qkv_bias.is_none()) L.qkv.bias = vector_of(qkv_bias, "qkv_bias", L.qkv.out_features);
    L.o = projection(o, "o", q_width, d.hidden);
    L.gate_up = projection(gate_up, "gate_up", d.hidden, 2 * d.intermediate);
    L.down = projection(down, "down", d.intermediate, d.hidden);
    auto k_cache = expect_array<float>(k_cache_obj, "k_cache", "float32", 4);
    auto v_cache = expect_array<float>(v_cache_obj, "v_cache", "float32", 4);
    expect_same_shape(v_cache, "v_cache", k_cache, "k_cache");
    expect_writeable(k_cache, "k_cache");
    expect_writeable(v_cache, "v_cache");
    if (k_cache.shape(2) != d.kv_heads || k_cache.shape(3) != d.head_dim ||
        k_cache.shape(1) <= 0) {
      throw py::value_error("k_cache " + shape_of(k_cache_obj) + " must be (num_blocks, "
                            "block_size, " + std::to_string(d.kv_heads) + ", " +
                            std::to_string(d.head_dim) + ")");
    }
    if (!layers_.empty() &&
        (k_cache.shape(0) != dims_.num_blocks || k_cache.shape(1) != dims_.block_size)) {
      throw py::value_error("k_cache " + shape_of(k_cache_obj) + " must have the blocks of "
                            "the first layer's cache");
    }
    dims_.num_blocks = k_cache.shape(0);
    dims_.block_size = k_cache.shape(1);
    L.k_cache = k_cache.mutable_data();
    L.v_cache = v_cache.mutable_data();
    if (window < 0) throw py::value_error("window must be >= 0 (0: no sliding window)");
    L.window = window;
    keep_.push_back(k_cache);
    keep_.push_back(v_cache);
    layers_.push_back(std::move(L));
  }

  // x: (tokens, hidden) in, out; residual_out: (tokens, hidden); cos, sin: (tokens, 1,
  // head_dim); slot_mapping: (tokens,) int64; block_tables: (tokens, max_blocks) int32;
  // context_lens: (tokens,) int32.
  void forward(const py::handle& x_obj, const py::handle& residual_obj, const py::handle& cos_obj,
               const py::handle& sin_obj, const py::handle& slots_obj,
               const py::handle& tables_obj, const py::handle& lens_obj, bool int8_activations,
               int num_threads) {
    if (layers_.empty()) throw py::value_error("the stack has no layers");
    auto x = expect_array<float>(x_obj, "x", "float32", 2);
    auto residual = expect_array<float>(residual_obj, "residual_out", "float32", 2);
    auto cos = expect_array<float>(cos_obj, "cos", "float32", 3);
    auto sin = expect_array<float>(sin_obj, "sin", "float32", 3);
    auto slots = expect_array<int64_t>(slots_obj, "slot_mapping", "int64", 1);
    auto tables = expect_array<int32_t>(tables_obj, "block_tables", "int32", 2);
    auto lens = expect_array<int32_t>(lens_obj, "context_lens", "int32", 1);
    const int64_t tokens = x.shape(0);
    if (x.shape(1) != dims_.hidden) {
      throw py::value_error("x " + shape_of(x_obj) + " must be (tokens, " +
                            std::to_string(dims_.hidden) + ")");
    }
    expect_same_shape(residual, "residual_out", x, "x");
    expect_same_shape(sin, "sin", cos, "cos");
    if (cos.shape(0) != tokens || cos.shape(1) != 1 || cos.shape(2) != dims_.head_dim ||
        slots.shape(0) != tokens || tables.shape(0) != tokens || lens.shape(0) != tokens) {
      throw py::value_error("cos, sin " + shape_of(cos_obj) + " must be (tokens, 1, head_dim) "
                            "and slot_mapping, block_tables, context_lens must have one row per "
                            "token of x " + shape_of(x_obj));
    }
    expect_writeable(x, "x");
    expect_writeable(residual, "residual_out");
    expect_threads(num_threads);
    const int64_t* s = slots.data();
    expect_slots(s, tokens, dims_.num_blocks * dims_.block_size);
    const DecodeShape shape{tokens, dims_.heads, dims_.kv_heads, dims_.head_dim,
                            dims_.num_blocks, dims_.block_size, tables.shape(1)};
    // The blocks some layer reads: from the widest window on (0: a layer reads them all),
    // so blocks released before every layer's window may be -1.
    int64_t widest = layers_.front().window;
    for (const auto& layer : layers_) {
      widest = layer.window == 0 || widest == 0 ? 0 : std::max(widest, layer.window);
    }
    check_decode_inputs(tables.data(), lens.data(), shape, widest);  // invalid_argument -> ValueError
    float* x_data = x.mutable_data();
    float* r_data = residual.mutable_data();
    py::gil_scoped_release release;
    decoder_step(layers_, dims_, x_data, r_data, cos.data(), sin.data(), s, tables.data(),
                 tables.shape(1), lens.data(), tokens, int8_activations, num_threads);
  }

  size_t size() const { return layers_.size(); }

 private:
  const float* vector_of(const py::handle& obj, const char* name, int64_t n) {
    auto a = expect_array<float>(obj, name, "float32", 1);
    if (a.shape(0) != n) {
      throw py::value_error(std::string(name) + " " + shape_of(obj) + " must be (" +
                            std::to_string(n) + ",)");
    }
    keep_.push_back(a);
    return a.data();
  }

  // parts: [(blocks, qtype, layout), ...] stacked along the output; in x out features.
  QuantProjection projection(const py::list& parts, const char* name, int64_t in, int64_t out) {
    QuantProjection p;
    p.in_features = in;
    p.out_features = out;
    for (const py::handle& item : parts) {
      if (!py::isinstance<py::tuple>(item) || py::len(item) != 3) {
        throw py::type_error(std::string(name) +
                             " must be a list of (blocks, qtype, layout) tuples");
      }
      auto part = py::reinterpret_borrow<py::tuple>(item);
      auto w = expect_array<uint8_t>(part[0], name, "uint8", 2);
      const std::string qtype = py::cast<std::string>(part[1]);
      const QuantType type = quant_type_from_name(qtype);
      const QuantLayout layout = quant_layout_from_name(py::cast<std::string>(part[2]), type, qtype);
      expect_blocks(w, part[0], type, qtype, in, (std::string(name) + "'s in_features").c_str(),
                    std::string(name) + "'s blocks");
      p.parts.push_back({w.data(), type, layout, w.shape(0)});
      keep_.push_back(w);
    }
    int64_t rows = 0;
    for (const QuantPart& part : p.parts) rows += part.rows;
    if (p.parts.empty() || rows != out) {
      throw py::value_error(std::string(name) + " must stack " + std::to_string(out) +
                            " rows of " + std::to_string(in) + " inputs, got " +
                            std::to_string(rows));
    }
    return p;
  }

  DecoderDims dims_;
  std::vector<DecoderLayer> layers_;
  std::vector<py::object> keep_;  // the arrays the layers point into
};

}  // namespace

void register_cpu_kernels(py::module_& m) {
  m.def("paged_decode_attention", &decode, py::arg("out"), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("num_threads") = 1, py::arg("window") = 0,
        "Decode attention over the paged KV cache on the CPU, fp32, written into out.\n\n"
        "out, q: (num_seqs, heads, head_dim); k_cache, v_cache: (num_blocks, block_size,\n"
        "kv_heads, head_dim); block_tables: (num_seqs, max_blocks) int32; context_lens:\n"
        "(num_seqs,) int32. All C-contiguous numpy arrays (torch CPU tensors' .numpy()).\n"
        "A sequence with context length 0 gets zeros. window > 0: attend only to the last\n"
        "window positions of each context.");
  m.def("rms_norm", &rms_norm_py, py::arg("out"), py::arg("residual_out"), py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("num_threads") = 1,
        "RMSNorm of the rows of x (plus residual when given), fp32, written into out.\n\n"
        "out = s * rsqrt(mean(s^2) + eps) * weight with s = x + residual (then also written\n"
        "into residual_out) or s = x. out, x, residual, residual_out: (rows, dim); weight:\n"
        "(dim,). All C-contiguous float32 arrays; residual and residual_out may be None.");
  m.def("silu_mul", &silu_mul_py, py::arg("out"), py::arg("h"), py::arg("num_threads") = 1,
        "SwiGLU activation, fp32: out = silu(h[:, :w]) * h[:, w:], written into out.\n\n"
        "h: (rows, 2 * w); out: (rows, w). Both C-contiguous float32 arrays.");
  m.def("rope", &rope_py, py::arg("out"), py::arg("x"), py::arg("cos"), py::arg("sin"),
        py::arg("num_threads") = 1,
        "Half-split rotary embedding, fp32: out = x * cos + swap_halves(x) * sin per head.\n\n"
        "x: (rows, heads, head_dim), contiguous within a row (rows may be apart); out: the\n"
        "same shape, C-contiguous, not overlapping x; cos, sin: (rows, 1, head_dim) factors\n"
        "of each row's position, the sign of the first half folded into sin.");
  m.def("store_kv", &store_kv_py, py::arg("k_cache"), py::arg("v_cache"), py::arg("k"),
        py::arg("v"), py::arg("slot_mapping"),
        "Write k[i], v[i] into cache slot slot_mapping[i] (-1: skip), fp32, in place.\n\n"
        "k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim) C-contiguous; k, v:\n"
        "(tokens, kv_heads, head_dim), contiguous within a row; slot_mapping: (tokens,) int64.");
  m.def("quant_matmul", &quant_matmul_py, py::arg("out"), py::arg("x"), py::arg("blocks"),
        py::arg("qtype"), py::arg("num_threads") = 1, py::arg("int8_activations") = false,
        py::arg("layout") = "rows",
        "out = x @ W.T with W stored as GGUF blocks of qtype (q8_0, q4_0, q4_1, q4_k, q5_k,\n"
        "q6_k), fp32, written into out.\n\n"
        "int8_activations: round each row of x to int8 per block first, as llama.cpp does,\n"
        "and take integer dot products (only for the types quant_matmul_int8_supported\n"
        "names; ValueError otherwise); else x stays fp32.\n"
        "layout: 'rows' (GGUF's) or 'rows8' (q8_0, q4_0, q4_1: see quant_relayout).\n"
        "x: (m, k) C-contiguous float32, k a multiple of the block size; blocks: (n, k / block *\n"
        "block_bytes) C-contiguous uint8, one weight row each; out: (m, n) float32, contiguous\n"
        "within a row (rows may be apart: a column slice of a wider output), not overlapping x.");
  m.def("quant_matmul_int8_supported",
        [](const std::string& qtype) { return quant_matmul_int8_supported(quant_type_from_name(qtype)); },
        py::arg("qtype"), "Whether quant_matmul takes int8_activations=True for qtype.");
  m.def("quant_dequantize", &quant_dequantize_py, py::arg("out"), py::arg("blocks"),
        py::arg("qtype"), py::arg("num_threads") = 1, py::arg("layout") = "rows",
        "The fp32 weight of GGUF blocks, written into out (rows, k) C-contiguous float32;\n"
        "blocks: (rows, k / block * block_bytes) C-contiguous uint8 in layout ('rows' or\n"
        "'rows8').");
  m.def("quant_relayout", &quant_relayout_py, py::arg("out"), py::arg("blocks"), py::arg("qtype"),
        py::arg("k"), py::arg("to_rows8"),
        "Copy a weight's q8_0 / q4_0 / q4_1 blocks (rows, k / 32 * block_bytes), C-contiguous\n"
        "uint8, into out (the same shape, not overlapping) in the 'rows8' layout\n"
        "(to_rows8) or back in GGUF's 'rows'. rows8: the rows in groups of 8 (any last\n"
        "rows % 8 rows after them unchanged); per group and block, the 8 rows' fp16 scales\n"
        "d, for q4_1 their offsets m, then their level bytes in 32-byte chunks, chunk c\n"
        "holding bytes 4c .. 4c + 3 of each row's levels in turn.");
  py::class_<DecoderStack>(m, "DecoderStack",
                           "The decoder layers of a Llama-style model with quantized projections,\n"
                           "run for one decode step in one call (csrc/cpu/decoder.h), fp32.")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, float, float>(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("eps"), py::arg("scale"))
      .def("add_layer", &DecoderStack::add_layer, py::arg("attn_norm"), py::arg("qkv"),
           py::arg("qkv_bias"), py::arg("q_norm"), py::arg("k_norm"), py::arg("o"),
           py::arg("mlp_norm"), py::arg("gate_up"), py::arg("down"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("window") = 0,
           "Append a layer. Norm weights: (n,) float32; each projection: a list of\n"
           "(blocks uint8 (rows, row_bytes), qtype, layout) stacked along the output;\n"
           "layout: 'rows' or 'rows8' (quant_relayout); qkv_bias,\n"
           "q_norm, k_norm may be None; k_cache, v_cache: (num_blocks, block_size, kv_heads,\n"
           "head_dim) float32, the same blocks in every layer. The stack keeps them alive.")
      .def("forward", &DecoderStack::forward, py::arg("x"), py::arg("residual_out"),
           py::arg("cos"), py::arg("sin"), py::arg("slot_mapping"), py::arg("block_tables"),
           py::arg("context_lens"), py::arg("int8_activations") = false,
           py::arg("num_threads") = 1,
           "One decode step: x (tokens, hidden) embeddings in, the last MLP output out;\n"
           "residual_out (tokens, hidden) the residual stream to add it to; cos, sin\n"
           "(tokens, 1, head_dim); slot_mapping (tokens,) int64; block_tables (tokens,\n"
           "max_blocks) and context_lens (tokens,) int32.")
      .def("__len__", &DecoderStack::size);
}

}  // namespace llm_engine
