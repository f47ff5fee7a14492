// The only pybind11 file: turns Python arguments into the plain C++ calls of
// csrc/*.h, translates errors (std::invalid_argument -> ValueError) and
// releases the GIL around every call that loops over data.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "philox.h"
#include "scheduler.h"
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

// ============================================================================
// The batch scheduler (csrc/scheduler.h). Python API: haltwise/scheduler.py.
// Lean on purpose, since it runs once per decode step: step() reads numpy
// buffers in place; the plan and its finished records are plain CPython
// types (creating and reading pybind11 objects costs several times more)
// whose arrays are built on first access, one copy each, read-only.
// ============================================================================
namespace scheduler_binding {

// Set once by scheduler_register_types(): StopReason members by code and the
// QueueFull class, both defined in Python. Strong references, kept for the
// life of the process.
PyObject* g_stop_reasons[kNumStopReasons] = {};
PyObject* g_queue_full = nullptr;

PyObject* new_reason(StopReason reason) {  // new reference
  PyObject* member = reason == StopReason::kNone ? Py_None : g_stop_reasons[static_cast<int>(reason)];
  if (member == nullptr) return PyLong_FromLong(static_cast<int>(reason));
  Py_INCREF(member);
  return member;
}

void register_types(py::handle stop_reason, py::handle queue_full) {
  for (int code = 1; code < kNumStopReasons; ++code) {
    py::object member = stop_reason(code);
    Py_XDECREF(g_stop_reasons[code]);
    g_stop_reasons[code] = member.release().ptr();
  }
  Py_XINCREF(queue_full.ptr());
  Py_XDECREF(g_queue_full);
  g_queue_full = queue_full.ptr();
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
  if (out == nullptr) throw py::error_already_set();
  auto* proxy = py::detail::array_proxy(out);
  if (size > 0) std::memcpy(proxy->data, data, size * sizeof(T));
  proxy->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return py::reinterpret_steal<py::array>(out);
}

// Runs a getter body that builds Python objects with pybind11; C++ exceptions
// become Python errors (a getter must not throw through the C API).
template <typename F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cached(PyObject** slot, const std::function<py::object()>& build) {
  if (*slot == nullptr) {
    PyObject* made = guarded([&] { return build().release().ptr(); });
    if (made == nullptr) return nullptr;
    *slot = made;
  }
  Py_INCREF(*slot);
  return *slot;
}

PyObject* no_new(PyTypeObject* type, PyObject*, PyObject*) {
  PyErr_Format(PyExc_TypeError, "haltwise._core.%s objects come from Scheduler.step(), not from a constructor",
               type->tp_name);
  return nullptr;
}

// ---- Finished --------------------------------------------------------------------

struct FinishedObject {
  PyObject_HEAD
  FinishedRecord* record;  // owned
  PyObject* tokens;        // cached array
  PyObject* signals;       // cached dict
};
PyTypeObject* g_finished_type = nullptr;

const FinishedRecord& record_of(PyObject* self) { return *reinterpret_cast<FinishedObject*>(self)->record; }

void finished_dealloc(PyObject* self) {
  auto* f = reinterpret_cast<FinishedObject*>(self);
  delete f->record;
  Py_XDECREF(f->tokens);
  Py_XDECREF(f->signals);
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);
}

PyObject* finished_tokens(PyObject* self, void*) {
  auto* f = reinterpret_cast<FinishedObject*>(self);
  return cached(&f->tokens, [f] { return read_only_array(f->record->summary.tokens.data(), f->record->summary.tokens.size()); });
}

PyObject* finished_signals(PyObject* self, void*) {
  auto* f = reinterpret_cast<FinishedObject*>(self);
  if (!f->record->summary.has_signals()) Py_RETURN_NONE;
  return cached(&f->signals, [f] {
    py::dict out;
    for (int i = 0; i < kNumRecorded; ++i) {
      const std::vector<float>& values = f->record->summary.signals[static_cast<size_t>(i)];
      out[kRecordedSignalNames[i]] = read_only_array(values.data(), values.size());
    }
    return py::object(std::move(out));
  });
}

#define HALTWISE_INT_GETTER(name, expr) \
  PyObject* finished_##name(PyObject* self, void*) { return PyLong_FromLongLong(record_of(self).expr); }
#define HALTWISE_FLOAT_GETTER(name) \
  PyObject* finished_##name(PyObject* self, void*) { return PyFloat_FromDouble(record_of(self).summary.name); }
HALTWISE_INT_GETTER(request_id, request_id)
HALTWISE_INT_GETTER(num_tokens, summary.num_tokens)
HALTWISE_INT_GETTER(steps_below_threshold, summary.steps_below_threshold)
HALTWISE_INT_GETTER(would_stop_step, summary.would_stop_step)
HALTWISE_FLOAT_GETTER(mean_topk_conf)
HALTWISE_FLOAT_GETTER(mean_logprob)
HALTWISE_FLOAT_GETTER(mean_neg_entropy)
HALTWISE_FLOAT_GETTER(mean_signal)
HALTWISE_FLOAT_GETTER(min_window_mean)
HALTWISE_FLOAT_GETTER(last_window_mean)
HALTWISE_FLOAT_GETTER(last_entropy)
#undef HALTWISE_INT_GETTER
#undef HALTWISE_FLOAT_GETTER

PyObject* finished_reason(PyObject* self, void*) { return new_reason(record_of(self).reason); }
PyObject* finished_would_stop_reason(PyObject* self, void*) {
  return new_reason(record_of(self).summary.would_stop_reason);
}
PyObject* finished_group(PyObject* self, void*) {
  const auto& group = record_of(self).group;
  if (!group) Py_RETURN_NONE;
  return PyLong_FromLongLong(*group);
}

PyObject* finished_repr(PyObject* self) {
  const FinishedRecord& r = record_of(self);
  const std::string text = "Finished(request_id=" + std::to_string(r.request_id) + ", reason=" +
                           stop_reason_name(r.reason) + ", num_tokens=" + std::to_string(r.summary.num_tokens) +
                           (r.group ? ", group=" + std::to_string(*r.group) : std::string()) + ")";
  return PyUnicode_FromString(text.c_str());
}

PyGetSetDef g_finished_getset[] = {
    {"request_id", finished_request_id, nullptr, nullptr, nullptr},
    {"reason", finished_reason, nullptr, nullptr, nullptr},
    {"group", finished_group, nullptr, nullptr, nullptr},
    {"num_tokens", finished_num_tokens, nullptr, nullptr, nullptr},
    {"tokens", finished_tokens, nullptr, nullptr, nullptr},
    {"mean_topk_conf", finished_mean_topk_conf, nullptr, nullptr, nullptr},
    {"mean_logprob", finished_mean_logprob, nullptr, nullptr, nullptr},
    {"mean_neg_entropy", finished_mean_neg_entropy, nullptr, nullptr, nullptr},
    {"mean_signal", finished_mean_signal, nullptr, nullptr, nullptr},
    {"min_window_mean", finished_min_window_mean, nullptr, nullptr, nullptr},
    {"last_window_mean", finished_last_window_mean, nullptr, nullptr, nullptr},
    {"last_entropy", finished_last_entropy, nullptr, nullptr, nullptr},
    {"steps_below_threshold", finished_steps_below_threshold, nullptr, nullptr, nullptr},
    {"would_stop_step", finished_would_stop_step, nullptr, nullptr, nullptr},
    {"would_stop_reason", finished_would_stop_reason, nullptr, nullptr, nullptr},
    {"signals", finished_signals, nullptr, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyObject* new_finished(FinishedRecord&& record) {
  auto* f = PyObject_New(FinishedObject, g_finished_type);
  if (f == nullptr) return nullptr;
  f->record = new FinishedRecord(std::move(record));
  f->tokens = nullptr;
  f->signals = nullptr;
  return reinterpret_cast<PyObject*>(f);
}

// ---- StepPlan ----------------------------------------------------------------------

struct PlanObject {
  PyObject_HEAD
  StepPlanData* data;  // owned
  bool slots;
  PyObject *finished, *keep, *admitted, *request_ids, *positions, *active, *free_slots;  // built on first access
};
PyTypeObject* g_plan_type = nullptr;

PlanObject* plan_of(PyObject* self) { return reinterpret_cast<PlanObject*>(self); }

void plan_dealloc(PyObject* self) {
  PlanObject* p = plan_of(self);
  delete p->data;
  for (PyObject* o : {p->finished, p->keep, p->admitted, p->request_ids, p->positions, p->active, p->free_slots})
    Py_XDECREF(o);
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);
}

PyObject* plan_finished(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  if (p->finished == nullptr) {
    std::vector<FinishedRecord>& records = p->data->finished;
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(records.size()));
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < records.size(); ++i) {
      PyObject* item = new_finished(std::move(records[i]));
      if (item == nullptr) {
        Py_DECREF(list);
        return nullptr;
      }
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
    }
    records.clear();
    p->finished = list;
  }
  Py_INCREF(p->finished);
  return p->finished;
}

PyObject* plan_admitted(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  if (p->admitted == nullptr) {
    const auto& admitted = p->data->admitted;
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(admitted.size()));
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < admitted.size(); ++i) {
      PyObject* pair = Py_BuildValue("(LL)", static_cast<long long>(admitted[i].first),
                                     static_cast<long long>(admitted[i].second));
      if (pair == nullptr) {
        Py_DECREF(list);
        return nullptr;
      }
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), pair);
    }
    p->admitted = list;
  }
  Py_INCREF(p->admitted);
  return p->admitted;
}

PyObject* plan_keep(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  return cached(&p->keep, [p] { return read_only_array(p->data->keep.data(), p->data->keep.size()); });
}
PyObject* plan_request_ids(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  return cached(&p->request_ids,
                [p] { return read_only_array(p->data->request_ids.data(), p->data->request_ids.size()); });
}
PyObject* plan_positions(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  return cached(&p->positions, [p] { return read_only_array(p->data->positions.data(), p->data->positions.size()); });
}
// The slots layout's mask and free slots, built on first access from the
// plan's active slots (increasing): O(capacity) only for a caller that reads them.
PyObject* plan_active(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  if (!p->slots) Py_RETURN_NONE;
  return cached(&p->active, [p] {
    std::unique_ptr<bool[]> mask(new bool[static_cast<size_t>(p->data->capacity)]());
    for (int32_t slot : p->data->active_slots) mask[static_cast<size_t>(slot)] = true;
    return read_only_array(mask.get(), static_cast<size_t>(p->data->capacity));
  });
}
PyObject* plan_free_slots(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  if (!p->slots) Py_RETURN_NONE;
  return cached(&p->free_slots, [p] {
    const auto& active = p->data->active_slots;
    std::vector<int64_t> free;
    free.reserve(static_cast<size_t>(p->data->capacity) - active.size());
    size_t next = 0;
    for (int64_t slot = 0; slot < p->data->capacity; ++slot) {
      if (next < active.size() && active[next] == slot) {
        ++next;
      } else {
        free.push_back(slot);
      }
    }
    return read_only_array(free.data(), free.size());
  });
}

PyObject* plan_repr(PyObject* self) {
  PlanObject* p = plan_of(self);
  const size_t finished = p->finished != nullptr ? static_cast<size_t>(PyList_GET_SIZE(p->finished))
                                                 : p->data->finished.size();
  const std::string text = "StepPlan(finished=" + std::to_string(finished) + ", keep=" +
                           std::to_string(p->data->keep.size()) + ", admitted=" +
                           std::to_string(p->data->admitted.size()) + ", next_batch=" +
                           std::to_string(p->data->request_ids.size()) + ")";
  return PyUnicode_FromString(text.c_str());
}

PyGetSetDef g_plan_getset[] = {
    {"finished", plan_finished, nullptr, nullptr, nullptr},
    {"keep", plan_keep, nullptr, nullptr, nullptr},
    {"admitted", plan_admitted, nullptr, nullptr, nullptr},
    {"request_ids", plan_request_ids, nullptr, nullptr, nullptr},
    {"positions", plan_positions, nullptr, nullptr, nullptr},
    {"active", plan_active, nullptr, nullptr, nullptr},
    {"free_slots", plan_free_slots, nullptr, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject* make_type(const char* name, const char* doc, size_t size, destructor dealloc, PyGetSetDef* getset,
                        reprfunc repr) {
  PyType_Slot slots[] = {
      {Py_tp_dealloc, reinterpret_cast<void*>(dealloc)},
      {Py_tp_getset, getset},
      {Py_tp_repr, reinterpret_cast<void*>(repr)},
      {Py_tp_new, reinterpret_cast<void*>(no_new)},
      {Py_tp_doc, const_cast<char*>(doc)},
      {0, nullptr},
  };
  PyType_Spec spec = {name, static_cast<int>(size), 0, Py_TPFLAGS_DEFAULT, slots};
  PyObject* type = PyType_FromSpec(&spec);
  if (type == nullptr) throw py::error_already_set();
  return reinterpret_cast<PyTypeObject*>(type);  // kept for the life of the process
}

// ---- inputs -------------------------------------------------------------------------

// One per-row input as a host buffer: a numpy array as is; a CPU torch tensor
// through its numpy() (shares its memory; ~0.8 us, cheaper than
// numpy.asarray's trip through Tensor.__array__); anything else through
// numpy.asarray.
struct HostArray {
  py::object owner;
  const char* data = nullptr;
  int64_t stride = 0;
  int64_t size = 0;
};

std::string type_name(py::handle value) { return py::str(py::type::handle_of(value).attr("__name__")); }

HostArray host_array(py::handle value, const char* name, char kind, int itemsize, const char* dtype_name) {
  HostArray out;
  if (py::isinstance<py::array>(value)) {
    out.owner = py::reinterpret_borrow<py::object>(value);
  } else {
    static PyObject* asarray = py::object(py::module_::import("numpy").attr("asarray")).release().ptr();
    static PyObject* numpy_name = PyUnicode_InternFromString("numpy");
    PyObject* converted = nullptr;
    PyObject* method = PyObject_GetAttr(value.ptr(), numpy_name);
    if (method != nullptr) {
      converted = PyObject_CallNoArgs(method);
      Py_DECREF(method);
      if (converted != nullptr && !py::isinstance<py::array>(converted)) {  // a numpy() that is not torch's
        Py_DECREF(converted);
        converted = PyObject_CallOneArg(asarray, value.ptr());
      }
    } else {
      PyErr_Clear();
      converted = PyObject_CallOneArg(asarray, value.ptr());
    }
    if (converted == nullptr) {
      const py::error_already_set error;
      throw std::invalid_argument(std::string("step: ") + name + " must be a numpy array or a CPU torch tensor, got " +
                                  type_name(value) + " (" + error.what() + ")");
    }
    out.owner = py::reinterpret_steal<py::object>(converted);
  }
  const auto* array = py::detail::array_proxy(out.owner.ptr());
  const auto* descr = py::detail::array_descriptor_proxy(array->descr);
  if (descr->kind != kind || py::reinterpret_borrow<py::dtype>(array->descr).itemsize() != itemsize ||
      descr->byteorder == '>')
    throw std::invalid_argument(std::string("step: ") + name + " must be " + dtype_name + ", got " +
                                std::string(py::str(py::reinterpret_borrow<py::object>(array->descr))));
  if (array->nd != 1)
    throw std::invalid_argument(std::string("step: ") + name + " must be 1-D [batch], got shape " +
                                std::string(py::str(out.owner.attr("shape"))));
  out.data = array->data;
  out.stride = array->strides[0];
  out.size = array->dimensions[0];
  return out;
}

// Not thread-safe by design; a second thread calling in at the same time is a bug, said out loud.
struct PyScheduler {
  explicit PyScheduler(const SchedulerOptions& options) : core(options) {}
  Scheduler core;
  std::mutex busy;
};

std::unique_lock<std::mutex> lock(PyScheduler& s) {
  std::unique_lock<std::mutex> held(s.busy, std::try_to_lock);
  if (!held.owns_lock())
    throw std::runtime_error("Scheduler: called from two threads at once; a scheduler is not thread-safe");
  return held;
}

constexpr const char* kInputNames[7] = {"tokens",         "signals.logprob",   "signals.entropy", "signals.confidence",
                                        "signals.margin", "signals.topk_conf", "signals.status"};

py::object step(PyScheduler& self, py::handle tokens, py::handle signals) {
  const auto held = lock(self);
  const int64_t rows = self.core.batch_size();
  HostArray inputs[7];
  inputs[0] = host_array(tokens, kInputNames[0], 'i', 8, "int64");
  StepInput in;
  if (signals.is_none() && rows == 0 && inputs[0].size == 0) {
    static const float no_signal = 0;
    static const int8_t no_status = 0;
    for (auto& p : in.signals) p = reinterpret_cast<const char*>(&no_signal);
    in.status = reinterpret_cast<const char*>(&no_status);
  } else {
    static PyObject* const fields[6] = {PyUnicode_InternFromString("logprob"), PyUnicode_InternFromString("entropy"),
                                        PyUnicode_InternFromString("confidence"), PyUnicode_InternFromString("margin"),
                                        PyUnicode_InternFromString("topk_conf"), PyUnicode_InternFromString("status")};
    for (int f = 0; f < 6; ++f) {
      PyObject* field = PyObject_GetAttr(signals.ptr(), fields[f]);
      if (field == nullptr) {
        PyErr_Clear();
        throw py::type_error("step: signals must have the attributes logprob, entropy, confidence, margin, "
                             "topk_conf and status (a haltwise.Signals, say), got " + type_name(signals) +
                             " without '" + py::str(fields[f]).cast<std::string>() + "'");
      }
      const auto owner = py::reinterpret_steal<py::object>(field);
      inputs[f + 1] = f < 5 ? host_array(owner, kInputNames[f + 1], 'f', 4, "float32")
                            : host_array(owner, kInputNames[f + 1], 'i', 1, "int8");
    }
    for (int f = 0; f < 5; ++f) {
      in.signals[f] = inputs[f + 1].data;
      in.signal_strides[f] = inputs[f + 1].stride;
    }
    in.status = inputs[6].data;
    in.status_stride = inputs[6].stride;
  }
  for (int f = 0; f < 7; ++f)
    if (inputs[f].owner && inputs[f].size != rows)
      throw std::invalid_argument(std::string("step: ") + kInputNames[f] + " must have shape (" +
                                  std::to_string(rows) + ",) (one per row of the batch), got (" +
                                  std::to_string(inputs[f].size) + ",)");
  in.batch = rows;
  in.tokens = inputs[0].data;
  in.tokens_stride = inputs[0].stride;

  auto data = std::make_unique<StepPlanData>();
  {
    py::gil_scoped_release release;
    self.core.step(in, data.get());
  }
  auto* plan = PyObject_New(PlanObject, g_plan_type);
  if (plan == nullptr) throw py::error_already_set();
  plan->data = data.release();
  plan->slots = self.core.layout() == Layout::kSlots;
  plan->finished = plan->keep = plan->admitted = plan->request_ids = plan->positions = plan->active =
      plan->free_slots = nullptr;
  return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(plan));
}

void bind(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const QueueFullError& e) {
      PyErr_SetString(g_queue_full != nullptr ? g_queue_full : PyExc_RuntimeError, e.what());
    }
  });

  m.def("scheduler_register_types", &register_types, py::arg("stop_reason"), py::arg("queue_full"),
        "Tells the native scheduler the Python StopReason enum and QueueFull exception (haltwise.scheduler).");

  g_finished_type = make_type("haltwise._core.Finished", "A sequence that ended (haltwise.Finished documents the fields).",
                              sizeof(FinishedObject), finished_dealloc, g_finished_getset, finished_repr);
  g_plan_type = make_type("haltwise._core.StepPlan", "What the caller does before the next step (haltwise.StepPlan "
                          "documents the fields).", sizeof(PlanObject), plan_dealloc, g_plan_getset, plan_repr);
  m.attr("Finished") = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_finished_type));
  m.attr("StepPlan") = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_plan_type));

  py::class_<StopRules, std::shared_ptr<StopRules>>(m, "StopRules",
                                                    "A validated StopConfig with its stop-sequence automaton built. "
                                                    "Use haltwise.StopConfig.")

      .def(py::init([](std::vector<int64_t> eos_ids, std::vector<std::vector<int64_t>> stop_sequences,
                       int64_t min_new_tokens, const std::string& low_conf_signal,
                       std::optional<double> low_conf_threshold, int64_t window,
                       std::optional<double> confident_entropy_below, std::optional<double> confident_margin_above,
                       int64_t confident_steps, bool shadow, bool record_signals) {
             StopConfig c;
             c.eos_ids = std::move(eos_ids);
             c.stop_sequences = std::move(stop_sequences);
             c.min_new_tokens = min_new_tokens;
             c.low_conf_signal = parse_conf_signal(low_conf_signal);
             c.low_conf_threshold = low_conf_threshold;
             c.window = window;
             c.confident_entropy_below = confident_entropy_below;
             c.confident_margin_above = confident_margin_above;
             c.confident_steps = confident_steps;
             c.shadow = shadow;
             c.record_signals = record_signals;
             return std::make_shared<StopRules>(std::move(c));
           }),
           py::kw_only(), py::arg("eos_ids"), py::arg("stop_sequences"), py::arg("min_new_tokens"),
           py::arg("low_conf_signal"), py::arg("low_conf_threshold"), py::arg("window"),
           py::arg("confident_entropy_below"), py::arg("confident_margin_above"), py::arg("confident_steps"),
           py::arg("shadow"), py::arg("record_signals"));

  py::class_<PyScheduler>(m, "Scheduler", "The native batch scheduler. Use haltwise.Scheduler.")
      .def(py::init([](int64_t capacity, const std::string& layout, int64_t max_queue, int64_t aging_steps,
                       int64_t wave_size, bool group_atomic, std::optional<double> consensus_fraction,
                       int64_t consensus_min_votes) {
             SchedulerOptions o;
             o.capacity = capacity;
             if (layout == "compact") {
               o.layout = Layout::kCompact;
             } else if (layout == "slots") {
               o.layout = Layout::kSlots;
             } else {
               throw std::invalid_argument("Scheduler: layout must be 'compact' or 'slots', got '" + layout + "'");
             }
             o.max_queue = max_queue;
             o.aging_steps = aging_steps;
             o.wave_size = wave_size;
             o.group_atomic = group_atomic;
             o.consensus_fraction = consensus_fraction;
             o.consensus_min_votes = consensus_min_votes;
             return std::make_unique<PyScheduler>(o);
           }),
           py::kw_only(), py::arg("capacity"), py::arg("layout"), py::arg("max_queue"), py::arg("aging_steps"),
           py::arg("wave_size"), py::arg("group_atomic"), py::arg("consensus_fraction"),
           py::arg("consensus_min_votes"))
      .def(
          "submit",
          [](PyScheduler& s, int64_t request_id, int64_t max_new_tokens, int64_t priority,
             std::optional<int64_t> group, std::shared_ptr<StopRules> rules) {
            const auto held = lock(s);
            s.core.submit(request_id, max_new_tokens, priority, group, std::move(rules));
          },
          py::arg("request_id"), py::arg("max_new_tokens"), py::arg("priority"), py::arg("group"), py::arg("rules"))
      .def("step", &step, py::arg("tokens"), py::arg("signals"))
      .def(
          "cancel",
          [](PyScheduler& s, int64_t request_id) {
            const auto held = lock(s);
            return s.core.cancel(request_id);
          },
          py::arg("request_id"))
      .def(
          "report_answer",
          [](PyScheduler& s, int64_t request_id, int64_t answer_key, double weight) {
            const auto held = lock(s);
            s.core.report_answer(request_id, answer_key, weight);
          },
          py::arg("request_id"), py::arg("answer_key"), py::arg("weight"))
      .def(
          "settle_group",
          [](PyScheduler& s, int64_t group) {
            const auto held = lock(s);
            return s.core.settle_group(group);
          },
          py::arg("group"))
      .def(
          "vote",
          [](PyScheduler& s, int64_t group) {
            const auto held = lock(s);
            py::dict out;
            for (const auto& [key, weight] : s.core.vote(group)) out[py::int_(key)] = weight;
            return out;
          },
          py::arg("group"))
      .def(
          "leader",
          [](PyScheduler& s, int64_t group) {
            const auto held = lock(s);
            return s.core.leader(group);
          },
          py::arg("group"))
      .def("stats",
           [](PyScheduler& s) {
             const auto held = lock(s);
             const SchedulerStats st = s.core.stats();
             py::dict finished;
             for (int code = 1; code < kNumStopReasons; ++code)
               finished[stop_reason_name(static_cast<StopReason>(code))] = st.finished[code];
             py::dict out;
             out["submitted"] = st.submitted;
             out["active"] = st.active;
             out["queued"] = st.queued;
             out["finished"] = finished;
             out["tokens_generated"] = st.tokens_generated;
             out["tokens_saved_estimate"] = st.tokens_saved_estimate;
             out["groups"] = st.groups;
             return out;
           })
      .def(
          "fail_next_admissions",
          [](PyScheduler& s, int64_t count) {
            const auto held = lock(s);
            s.core.fail_next_admissions(count);
          },
          py::arg("count"), "Testing hook: the next `count` admissions fail as if memory ran out.")
      .def_property_readonly("capacity", [](PyScheduler& s) { return s.core.capacity(); })
      .def_property_readonly("layout",
                             [](PyScheduler& s) { return s.core.layout() == Layout::kSlots ? "slots" : "compact"; })
      .def_property_readonly("batch_size", [](PyScheduler& s) { return s.core.batch_size(); });
}

}  // namespace scheduler_binding
// ============================================================================ end of the scheduler section

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

  scheduler_binding::bind(m);
}
