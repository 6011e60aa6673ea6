// Python bindings of the C++ side of llm_engine (built as llm_engine._C).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace llm_engine {
void register_kv_cache(py::module_& m);      // csrc/kv_cache/bindings.cpp
void register_cpu_kernels(py::module_& m);  // csrc/cpu/bindings.cpp
}  // namespace llm_engine

PYBIND11_MODULE(_C, m) {
  m.doc() = "llm_engine native extension: KV-cache block manager, CPU kernels";
  m.def("version", []() { return "0.1.0"; }, "Version of the native extension.");
  llm_engine::register_kv_cache(m);
  llm_engine::register_cpu_kernels(m);
}
