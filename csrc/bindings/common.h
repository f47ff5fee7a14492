// Shared by the binding files (csrc/bindings.cc: the module; py_scheduler.cc:
// haltwise._core.Scheduler and StopRules; plan_types.cc: the plan and
// finished-record types). Turns C++ errors into Python ones: every function
// that the CPython C API calls directly goes through guarded(), so no C++
// exception ever unwinds through a C frame.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <stdexcept>

namespace haltwise {
namespace binding {

namespace py = pybind11;

// Runs `body` (which returns a new reference, or nullptr with a Python error
// set); a C++ exception becomes a Python error (MemoryError for bad_alloc).
template <typename F>
PyObject* guarded(F&& body) noexcept {
  try {
    return body();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "haltwise._core: unknown C++ exception");
  }
  return nullptr;
}

// A read-only 1-D copy of `data`, through the numpy C API directly (cheaper
// than py::array_t's constructor, which allocates its shape and strides).
template <typename T>
py::array read_only_array(const T* data, size_t size) {
  const auto& api = py::detail::npy_api::get();
  PyObject* descr = api.PyArray_DescrFromType_(py::detail::npy_format_descriptor<T>::value);
  if (descr == nullptr) throw py::error_already_set();
  Py_intptr_t dims[1] = {static_cast<Py_intptr_t>(size)};
  PyObject* out = api.PyArray_NewFromDescr_(api.PyArray_Type_, descr, 1, dims, nullptr, nullptr, 0, nullptr);
  if (out == nullptr) throw py::error_already_set();  // descr was stolen even so
  auto* proxy = py::detail::array_proxy(out);
  if (size > 0) std::memcpy(proxy->data, data, size * sizeof(T));
  proxy->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return py::reinterpret_steal<py::array>(out);
}

}  // namespace binding
}  // namespace haltwise
