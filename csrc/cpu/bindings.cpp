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

#include <cstdint>
#include <string>

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
  const int64_t num_slots = k_cache.shape(0) * k_cache.shape(1);
  const int64_t* s = slots.data();
  for (int64_t i = 0; i < slots.shape(0); ++i) {
    if (s[i] < -1 || s[i] >= num_slots) {
      throw py::value_error("slot_mapping[" + std::to_string(i) + "] = " + std::to_string(s[i]) +
                            " is not a cache slot in [0, " + std::to_string(num_slots) +
                            ") nor -1 (skip)");
    }
  }
  float* k_data = k_cache.mutable_data();
  float* v_data = v_cache.mutable_data();
  py::gil_scoped_release release;
  store_kv(k_data, v_data, k.data(), k_stride, v.data(), v_stride, s, k.shape(0),
           k.shape(1) * k.shape(2));
}

// The format of qtype, with k checked to be whole blocks and blocks (rows, row bytes) to
// hold them.
QuantFormat expect_blocks(const py::array_t<uint8_t>& w, const py::handle& w_obj, QuantType type,
                          const std::string& qtype, int64_t k, const char* k_from) {
  const QuantFormat f = quant_format(type);
  if (k <= 0 || k % f.block != 0) {
    throw py::value_error(std::string(k_from) + " must be a positive multiple of the " + qtype +
                          " block size " + std::to_string(f.block) + ", got " + std::to_string(k));
  }
  if (w.shape(1) != k / f.block * f.bytes) {
    throw py::value_error("blocks " + shape_of(w_obj) + " must be (rows, " +
                          std::to_string(k / f.block * f.bytes) + ") for " + qtype + " with k = " +
                          std::to_string(k));
  }
  return f;
}

void quant_matmul_py(const py::handle& out_obj, const py::handle& x_obj,
                     const py::handle& blocks_obj, const std::string& qtype, int num_threads) {
  auto [out, out_stride] = expect_rows<float>(out_obj, "out", "float32", 2);
  auto x = expect_array<float>(x_obj, "x", "float32", 2);
  auto w = expect_array<uint8_t>(blocks_obj, "blocks", "uint8", 2);
  const QuantType type = quant_type_from_name(qtype);  // std::invalid_argument -> ValueError
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
  quant_matmul(out_data, out_stride, x.data(), w.data(), type, m, n, k, num_threads);
}

void quant_dequantize_py(const py::handle& out_obj, const py::handle& blocks_obj,
                         const std::string& qtype, int num_threads) {
  auto out = expect_array<float>(out_obj, "out", "float32", 2);
  auto w = expect_array<uint8_t>(blocks_obj, "blocks", "uint8", 2);
  const QuantType type = quant_type_from_name(qtype);
  expect_blocks(w, blocks_obj, type, qtype, out.shape(1), "out's last dimension (k)");
  if (out.shape(0) != w.shape(0)) {
    throw py::value_error("out " + shape_of(out_obj) + " must have one row per row of blocks " +
                          shape_of(blocks_obj));
  }
  expect_writeable(out, "out");
  expect_threads(num_threads);
  float* out_data = out.mutable_data();
  py::gil_scoped_release release;
  quant_dequantize(out_data, w.data(), type, w.shape(0), out.shape(1), num_threads);
}

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
        py::arg("qtype"), py::arg("num_threads") = 1,
        "out = x @ W.T with W stored as GGUF blocks of qtype (q8_0, q4_0, q4_1, q4_k, q5_k,\n"
        "q6_k), fp32, written into out.\n\n"
        "x: (m, k) C-contiguous float32, k a multiple of the block size; blocks: (n, k / block *\n"
        "block_bytes) C-contiguous uint8, one weight row each; out: (m, n) float32, contiguous\n"
        "within a row (rows may be apart: a column slice of a wider output), not overlapping x.");
  m.def("quant_dequantize", &quant_dequantize_py, py::arg("out"), py::arg("blocks"),
        py::arg("qtype"), py::arg("num_threads") = 1,
        "The fp32 weight of GGUF blocks, written into out (rows, k) C-contiguous float32;\n"
        "blocks: (rows, k / block * block_bytes) C-contiguous uint8.");
}

}  // namespace llm_engine
