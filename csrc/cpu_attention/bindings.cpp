// Python binding of the CPU decode attention (llm_engine._C.paged_decode_attention).
//
// Arrays come from torch CPU tensors through .numpy() (zero-copy). Exceptions seen
// from Python: TypeError for a wrong dtype, layout or non-array argument; ValueError
// for inconsistent shapes, a context length out of range or a block id that is not
// in the cache.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cpu_attention/paged_decode.h"

namespace py = pybind11;

namespace llm_engine {
namespace {

template <typename T>
py::array_t<T> expect_array(const py::handle& obj, const char* name, const char* dtype,
                            py::ssize_t ndim) {
  if (!py::isinstance<py::array_t<T, py::array::c_style>>(obj)) {
    throw py::type_error(std::string(name) + " must be a C-contiguous " + dtype + " array, got " +
                         std::string(py::str(py::type::handle_of(obj))) +
                         (py::isinstance<py::array>(obj)
                              ? " of dtype " + std::string(py::str(obj.attr("dtype")))
                              : ""));
  }
  auto arr = py::reinterpret_borrow<py::array_t<T>>(obj);
  if (arr.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) +
                          " dimensions, got shape " + std::string(py::str(obj.attr("shape"))));
  }
  return arr;
}

void decode(const py::handle& out_obj, const py::handle& q_obj, const py::handle& k_obj,
            const py::handle& v_obj, const py::handle& tables_obj, const py::handle& lens_obj,
            float scale, int num_threads) {
  auto out = expect_array<float>(out_obj, "out", "float32", 3);
  auto q = expect_array<float>(q_obj, "q", "float32", 3);
  auto k = expect_array<float>(k_obj, "k_cache", "float32", 4);
  auto v = expect_array<float>(v_obj, "v_cache", "float32", 4);
  auto tables = expect_array<int32_t>(tables_obj, "block_tables", "int32", 2);
  auto lens = expect_array<int32_t>(lens_obj, "context_lens", "int32", 1);
  const DecodeShape s{q.shape(0), q.shape(1), k.shape(2), q.shape(2),
                      k.shape(0), k.shape(1), tables.shape(1)};
  const auto shape_of = [](const py::handle& a) { return std::string(py::str(a.attr("shape"))); };
  if (s.kv_heads <= 0 || s.heads % s.kv_heads != 0 || k.shape(3) != s.head_dim) {
    throw py::value_error("k_cache " + shape_of(k_obj) +
                          " must be (num_blocks, block_size, kv_heads, head_dim) with heads a "
                          "multiple of kv_heads and head_dim as in q " + shape_of(q_obj));
  }
  if (s.block_size <= 0) throw py::value_error("k_cache must have block_size > 0");
  for (int i = 0; i < 4; ++i) {
    if (v.shape(i) != k.shape(i)) {
      throw py::value_error("v_cache " + shape_of(v_obj) + " must match k_cache " + shape_of(k_obj));
    }
  }
  for (int i = 0; i < 3; ++i) {
    if (out.shape(i) != q.shape(i)) {
      throw py::value_error("out " + shape_of(out_obj) + " must match q " + shape_of(q_obj));
    }
  }
  if (tables.shape(0) != s.num_seqs || lens.shape(0) != s.num_seqs) {
    throw py::value_error("block_tables " + shape_of(tables_obj) + " and context_lens " +
                          shape_of(lens_obj) + " must have one row per sequence of q " +
                          shape_of(q_obj));
  }
  if (!out.writeable()) throw py::value_error("out must be writeable");
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1");
  check_decode_inputs(tables.data(), lens.data(), s);  // std::invalid_argument -> ValueError
  float* out_data = out.mutable_data();
  py::gil_scoped_release release;
  paged_decode_attention(out_data, q.data(), k.data(), v.data(), tables.data(), lens.data(), s,
                         scale, num_threads);
}

}  // namespace

void register_cpu_attention(py::module_& m) {
  m.def("paged_decode_attention", &decode, py::arg("out"), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("num_threads") = 1,
        "Decode attention over the paged KV cache on the CPU, fp32, written into out.\n\n"
        "out, q: (num_seqs, heads, head_dim); k_cache, v_cache: (num_blocks, block_size,\n"
        "kv_heads, head_dim); block_tables: (num_seqs, max_blocks) int32; context_lens:\n"
        "(num_seqs,) int32. All C-contiguous numpy arrays (torch CPU tensors' .numpy()).\n"
        "A sequence with context length 0 gets zeros.");
}

}  // namespace llm_engine
