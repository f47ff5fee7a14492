// The only pybind11 file: turns Python arguments into the plain C++ calls of
// csrc/*.h, translates errors (std::invalid_argument -> ValueError) and
// releases the GIL around every call that loops over data.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
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
// Lean on purpose: step() reads numpy buffers in place, builds the plan's
// arrays with one copy each, and Finished objects only for rows that ended.
// ============================================================================
namespace scheduler_binding {

// Set once by scheduler_register_types(): StopReason members by code and the
// QueueFull class, both defined in Python. Strong references, kept for the
// life of the process.
PyObject* g_stop_reasons[kNumStopReasons] = {};
PyObject* g_queue_full = nullptr;

py::object reason_object(StopReason reason) {
  if (reason == StopReason::kNone) return py::none();
  PyObject* member = g_stop_reasons[static_cast<int>(reason)];
  if (member == nullptr) return py::int_(static_cast<int>(reason));
  return py::reinterpret_borrow<py::object>(member);
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

void make_read_only(py::array& array) {
  py::detail::array_proxy(array.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
}

template <typename T>
py::array read_only_array(const T* data, size_t size) {
  py::array_t<T> out(static_cast<py::ssize_t>(size));
  if (size > 0) std::memcpy(out.mutable_data(), data, size * sizeof(T));
  make_read_only(out);
  return std::move(out);
}

py::array read_only_bool_array(const std::vector<uint8_t>& flags) {
  py::array_t<bool> out(static_cast<py::ssize_t>(flags.size()));
  if (!flags.empty()) std::memcpy(out.mutable_data(), flags.data(), flags.size());
  make_read_only(out);
  return std::move(out);
}

// One per-row input as a host buffer: a numpy array as is, anything else
// (a CPU torch tensor) through numpy.asarray, which shares its memory.
struct HostArray {
  py::object owner;
  const char* data = nullptr;
  int64_t stride = 0;
  int64_t size = 0;
};

HostArray host_array(py::handle value, const std::string& name, char kind, int itemsize, const char* dtype_name) {
  HostArray out;
  if (py::isinstance<py::array>(value)) {
    out.owner = py::reinterpret_borrow<py::object>(value);
  } else {
    static PyObject* asarray = py::module_::import("numpy").attr("asarray").release().ptr();
    PyObject* converted = PyObject_CallOneArg(asarray, value.ptr());
    if (converted == nullptr) {
      const py::error_already_set error;
      throw std::invalid_argument("step: " + name + " must be a numpy array or a CPU torch tensor, got " +
                                  std::string(py::str(py::type::handle_of(value).attr("__name__"))) + " (" +
                                  error.what() + ")");
    }
    out.owner = py::reinterpret_steal<py::object>(converted);
  }
  const auto array = py::reinterpret_borrow<py::array>(out.owner);
  const py::dtype dtype = array.dtype();
  if (dtype.kind() != kind || dtype.itemsize() != itemsize || dtype.byteorder() == '>')
    throw std::invalid_argument("step: " + name + " must be " + dtype_name + ", got " + std::string(py::str(dtype)));
  if (array.ndim() != 1)
    throw std::invalid_argument("step: " + name + " must be 1-D [batch], got shape " +
                                std::string(py::str(py::tuple(array.attr("shape")))));
  out.data = static_cast<const char*>(array.data());
  out.stride = array.strides(0);
  out.size = array.shape(0);
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

struct PyFinished {
  FinishedRecord record;
  py::object tokens;   // cached array
  py::object signals;  // cached dict
};

struct PyStepPlan {
  StepPlanData data;
  bool slots = false;
  py::object finished, keep, admitted, request_ids, positions, active, free_slots;  // built on first access
};

std::unique_ptr<PyStepPlan> step(PyScheduler& self, py::handle tokens, py::handle signals) {
  const auto held = lock(self);
  const int64_t rows = self.core.batch_size();
  StepInput in;
  HostArray inputs[7];
  inputs[0] = host_array(tokens, "tokens", 'i', 8, "int64");
  if (signals.is_none() && rows == 0 && inputs[0].size == 0) {
    static const float no_signal = 0;
    static const int8_t no_status = 0;
    for (auto& p : in.signals) p = reinterpret_cast<const char*>(&no_signal);
    in.status = reinterpret_cast<const char*>(&no_status);
  } else {
    static const char* const fields[6] = {"logprob", "entropy", "confidence", "margin", "topk_conf", "status"};
    for (int f = 0; f < 6; ++f) {
      PyObject* field = PyObject_GetAttrString(signals.ptr(), fields[f]);
      if (field == nullptr) {
        PyErr_Clear();
        throw py::type_error("step: signals must have the attributes logprob, entropy, confidence, margin, "
                             "topk_conf and status (a haltwise.Signals, say), got " +
                             std::string(py::str(py::type::handle_of(signals).attr("__name__"))) + " without '" +
                             fields[f] + "'");
      }
      const auto owner = py::reinterpret_steal<py::object>(field);
      const std::string name = std::string("signals.") + fields[f];
      inputs[f + 1] = f < 5 ? host_array(owner, name, 'f', 4, "float32") : host_array(owner, name, 'i', 1, "int8");
    }
    for (int f = 0; f < 5; ++f) {
      in.signals[f] = inputs[f + 1].data;
      in.signal_strides[f] = inputs[f + 1].stride;
    }
    in.status = inputs[6].data;
    in.status_stride = inputs[6].stride;
  }
  static const char* const names[7] = {"tokens", "signals.logprob", "signals.entropy", "signals.confidence",
                                       "signals.margin", "signals.topk_conf", "signals.status"};
  for (int f = 0; f < 7; ++f)
    if (inputs[f].owner && inputs[f].size != rows)
      throw std::invalid_argument(std::string("step: ") + names[f] + " must have shape (" + std::to_string(rows) +
                                  ",) (one per row of the batch), got (" + std::to_string(inputs[f].size) + ",)");
  in.batch = rows;
  in.tokens = inputs[0].data;
  in.tokens_stride = inputs[0].stride;
  auto plan = std::make_unique<PyStepPlan>();
  plan->slots = self.core.layout() == Layout::kSlots;
  {
    py::gil_scoped_release release;
    self.core.step(in, &plan->data);
  }
  return plan;
}

py::object finished_list(PyStepPlan& plan) {
  if (!plan.finished) {
    py::list out(plan.data.finished.size());
    for (size_t i = 0; i < plan.data.finished.size(); ++i) {
      auto item = std::make_unique<PyFinished>();
      item->record = std::move(plan.data.finished[i]);
      out[i] = py::cast(std::move(item));
    }
    plan.data.finished.clear();
    plan.finished = std::move(out);
  }
  return plan.finished;
}

py::object admitted_list(PyStepPlan& plan) {
  if (!plan.admitted) {
    py::list out(plan.data.admitted.size());
    for (size_t i = 0; i < plan.data.admitted.size(); ++i)
      out[i] = py::make_tuple(plan.data.admitted[i].first, plan.data.admitted[i].second);
    plan.admitted = std::move(out);
  }
  return plan.admitted;
}

py::object cached_int64(py::object& cache, const std::vector<int64_t>& values) {
  if (!cache) cache = read_only_array(values.data(), values.size());
  return cache;
}

py::object free_slots(PyStepPlan& plan) {
  if (!plan.slots) return py::none();
  if (!plan.free_slots) {
    std::vector<int64_t> free;
    for (size_t slot = 0; slot < plan.data.active.size(); ++slot)
      if (!plan.data.active[slot]) free.push_back(static_cast<int64_t>(slot));
    plan.free_slots = read_only_array(free.data(), free.size());
  }
  return plan.free_slots;
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

  py::class_<PyFinished>(m, "Finished", "A sequence that ended (haltwise.Finished documents the fields).")
      .def_property_readonly("request_id", [](const PyFinished& f) { return f.record.request_id; })
      .def_property_readonly("reason", [](const PyFinished& f) { return reason_object(f.record.reason); })
      .def_property_readonly("group", [](const PyFinished& f) { return f.record.group; })
      .def_property_readonly("num_tokens", [](const PyFinished& f) { return f.record.summary.num_tokens; })
      .def_property_readonly("tokens",
                             [](PyFinished& f) {
                               if (!f.tokens)
                                 f.tokens = read_only_array(f.record.summary.tokens.data(), f.record.summary.tokens.size());
                               return f.tokens;
                             })
      .def_property_readonly("mean_topk_conf", [](const PyFinished& f) { return f.record.summary.mean_topk_conf; })
      .def_property_readonly("mean_logprob", [](const PyFinished& f) { return f.record.summary.mean_logprob; })
      .def_property_readonly("mean_neg_entropy", [](const PyFinished& f) { return f.record.summary.mean_neg_entropy; })
      .def_property_readonly("mean_signal", [](const PyFinished& f) { return f.record.summary.mean_signal; })
      .def_property_readonly("min_window_mean", [](const PyFinished& f) { return f.record.summary.min_window_mean; })
      .def_property_readonly("last_window_mean", [](const PyFinished& f) { return f.record.summary.last_window_mean; })
      .def_property_readonly("last_entropy", [](const PyFinished& f) { return f.record.summary.last_entropy; })
      .def_property_readonly("steps_below_threshold",
                             [](const PyFinished& f) { return f.record.summary.steps_below_threshold; })
      .def_property_readonly("would_stop_step", [](const PyFinished& f) { return f.record.summary.would_stop_step; })
      .def_property_readonly("would_stop_reason",
                             [](const PyFinished& f) { return reason_object(f.record.summary.would_stop_reason); })
      .def_property_readonly("signals",
                             [](PyFinished& f) -> py::object {
                               if (!f.record.summary.has_signals) return py::none();
                               if (!f.signals) {
                                 py::dict out;
                                 for (int i = 0; i < kNumRecorded; ++i)
                                   out[kRecordedSignalNames[i]] = read_only_array(
                                       f.record.summary.signals[i].data(), f.record.summary.signals[i].size());
                                 f.signals = std::move(out);
                               }
                               return f.signals;
                             })
      .def("__repr__", [](const PyFinished& f) {
        return "Finished(request_id=" + std::to_string(f.record.request_id) + ", reason=" +
               stop_reason_name(f.record.reason) + ", num_tokens=" + std::to_string(f.record.summary.num_tokens) +
               (f.record.group ? ", group=" + std::to_string(*f.record.group) : std::string()) + ")";
      });

  py::class_<PyStepPlan>(m, "StepPlan", "What the caller does before the next step (haltwise.StepPlan documents it).")
      .def_property_readonly("finished", &finished_list)
      .def_property_readonly("keep", [](PyStepPlan& p) { return cached_int64(p.keep, p.data.keep); })
      .def_property_readonly("admitted", &admitted_list)
      .def_property_readonly("request_ids", [](PyStepPlan& p) { return cached_int64(p.request_ids, p.data.request_ids); })
      .def_property_readonly("positions", [](PyStepPlan& p) { return cached_int64(p.positions, p.data.positions); })
      .def_property_readonly("active",
                             [](PyStepPlan& p) -> py::object {
                               if (!p.slots) return py::none();
                               if (!p.active) p.active = read_only_bool_array(p.data.active);
                               return p.active;
                             })
      .def_property_readonly("free_slots", &free_slots)
      .def("__repr__", [](PyStepPlan& p) {
        return "StepPlan(finished=" + std::to_string(py::len(finished_list(p))) + ", keep=" +
               std::to_string(p.data.keep.size()) + ", admitted=" + std::to_string(p.data.admitted.size()) +
               ", next_batch=" + std::to_string(p.data.request_ids.size()) + ")";
      });

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
             return out;
           })
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

  scheduler_binding::bind(m);
}
