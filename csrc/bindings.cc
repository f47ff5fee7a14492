// The module haltwise._core: the fused CPU signal kernel and Philox here, the
// scheduler in csrc/bindings/py_scheduler.cc, its plan types in csrc/bindings/plan_types.cc.
// The binding files turn Python arguments into the plain C++ calls of
// csrc/*.h, translate errors (std::invalid_argument -> ValueError) and
// release the GIL around every call that loops over data.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "philox.h"
#include "bindings/py_scheduler.h"
#include "stop_rules.h"
#include "signals_cpu.h"

namespace py = pybind11;
using namespace haltwise;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void signals_cpu(uintptr_t logits, int dtype, int64_t batch, int64_t vocab, int64_t row_stride,
                 bool sample, float inv_temperature, int top_k_conf, uintptr_t seed, uintptr_t offset,
                 bool salt_with_row, uintptr_t token, uintptr_t logprob, uintptr_t entropy,
                 uintptr_t confidence, uintptr_t margin, uintptr_t topk_conf, uintptr_t status,
                 int num_threads) {
  if (dtype < 0 || dtype > 2)
    throw std::invalid_argument("signals_cpu: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(dtype));
  SignalsArgs a;
  a.logits = as_ptr<const void>(logits);
  a.dtype = static_cast<DType>(dtype);
  a.batch = batch;
  a.vocab = vocab;
  a.row_stride = row_stride;
  a.sample = sample;
  a.inv_temperature = inv_temperature;
  a.top_k_conf = top_k_conf;
  a.seed = as_ptr<const int64_t>(seed);
  a.offset = as_ptr<const int64_t>(offset);
  a.salt_with_row = salt_with_row;
  a.token = as_ptr<int64_t>(token);
  a.logprob = as_ptr<float>(logprob);
  a.entropy = as_ptr<float>(entropy);
  a.confidence = as_ptr<float>(confidence);
  a.margin = as_ptr<float>(margin);
  a.topk_conf = as_ptr<float>(topk_conf);
  a.status = as_ptr<int8_t>(status);
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  compute_signals_cpu(a);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "haltwise native core: the fused CPU signal kernel and the batch scheduler";

  m.def("signals_cpu", &signals_cpu, py::kw_only(), py::arg("logits"), py::arg("dtype"), py::arg("batch"),
        py::arg("vocab"), py::arg("row_stride"), py::arg("sample"), py::arg("inv_temperature"),
        py::arg("top_k_conf"), py::arg("seed"), py::arg("offset"), py::arg("salt_with_row"), py::arg("token"),
        py::arg("logprob"), py::arg("entropy"), py::arg("confidence"), py::arg("margin"), py::arg("topk_conf"),
        py::arg("status"), py::arg("num_threads") = 0,
        "Fused stop signals over raw buffers (addresses as ints). Use haltwise.signals instead.");
  m.def("signals_cpu_isa", &signals_cpu_isa, "Instruction set the CPU kernel dispatches to here.");
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
        const Philox4 r = philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      py::arg("counter"), py::arg("key"), "Philox 4x32-10 of one counter (4 words) under a key (2 words).");

  m.attr("STATUS_NAN") = int(kStatusNaN);
  m.attr("STATUS_POSINF") = int(kStatusPosInf);
  m.attr("STATUS_NO_FINITE") = int(kStatusNoFinite);
  m.attr("MAX_TOP_K_CONF") = kMaxTopKConf;
  m.attr("MAX_NEW_TOKENS") = kMaxNewTokens;
  m.attr("MAX_WINDOW") = kMaxWindow;

  binding::bind_scheduler(m);
}
