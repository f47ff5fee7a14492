// haltwise._core.Scheduler, StopRules and StopTable: the native batch
// scheduler (csrc/scheduler.h), its compiled stop rules, and stop states fed
// by handle (csrc/stop_table.h). Python API and semantics:
// haltwise/scheduler.py. step() and feed() read numpy buffers in place and
// release the GIL while the core works; step() returns a StepPlan
// (plan_types.h).
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "plan_types.h"
#include "scheduler.h"
#include "stop_table.h"

namespace haltwise {
namespace binding {
namespace {

// The QueueFull class defined in Python (a strong reference, kept for the life of the process).
PyObject* g_queue_full = nullptr;

void register_types(py::handle stop_reason, py::handle queue_full) {
  set_stop_reasons(stop_reason);
  Py_XINCREF(queue_full.ptr());
  Py_XDECREF(g_queue_full);
  g_queue_full = queue_full.ptr();
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

HostArray host_array(const char* where, py::handle value, const char* name, char kind, int itemsize,
                     const char* dtype_name) {
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
      throw std::invalid_argument(std::string(where) + ": " + name + " must be a numpy array or a CPU torch tensor, got " +
                                  type_name(value) + " (" + error.what() + ")");
    }
    out.owner = py::reinterpret_steal<py::object>(converted);
  }
  const auto* array = py::detail::array_proxy(out.owner.ptr());
  const auto* descr = py::detail::array_descriptor_proxy(array->descr);
  if (descr->kind != kind || py::reinterpret_borrow<py::dtype>(array->descr).itemsize() != itemsize ||
      descr->byteorder == '>')
    throw std::invalid_argument(std::string(where) + ": " + name + " must be " + dtype_name + ", got " +
                                std::string(py::str(py::reinterpret_borrow<py::object>(array->descr))));
  if (array->nd != 1)
    throw std::invalid_argument(std::string(where) + ": " + name + " must be 1-D [batch], got shape " +
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

// The owner's lock, or a clear error when another thread holds it (`what` names the class).
std::unique_lock<std::mutex> try_lock(std::mutex& busy, const char* what) {
  std::unique_lock<std::mutex> held(busy, std::try_to_lock);
  if (!held.owns_lock())
    throw std::runtime_error(std::string(what) + ": called from two threads at once; a " + what +
                             " is not thread-safe");
  return held;
}

std::unique_lock<std::mutex> lock(PyScheduler& s) { return try_lock(s.busy, "Scheduler"); }

constexpr const char* kInputNames[7] = {"tokens",         "signals.logprob",   "signals.entropy", "signals.confidence",
                                        "signals.margin", "signals.topk_conf", "signals.status"};

// The six per-row signal arrays of `signals` (a haltwise.Signals, or any object
// with those attributes) into out[0..5]: logprob .. topk_conf (float32), status (int8).
void read_signals(const char* where, py::handle signals, HostArray* out) {
  static PyObject* const fields[6] = {PyUnicode_InternFromString("logprob"), PyUnicode_InternFromString("entropy"),
                                      PyUnicode_InternFromString("confidence"), PyUnicode_InternFromString("margin"),
                                      PyUnicode_InternFromString("topk_conf"), PyUnicode_InternFromString("status")};
  for (int f = 0; f < 6; ++f) {
    PyObject* field = PyObject_GetAttr(signals.ptr(), fields[f]);
    if (field == nullptr) {
      PyErr_Clear();
      throw py::type_error(std::string(where) + ": signals must have the attributes logprob, entropy, confidence, "
                           "margin, topk_conf and status (a haltwise.Signals, say), got " + type_name(signals) +
                           " without '" + py::str(fields[f]).cast<std::string>() + "'");
    }
    const auto owner = py::reinterpret_steal<py::object>(field);
    out[f] = f < 5 ? host_array(where, owner, kInputNames[f + 1], 'f', 4, "float32")
                   : host_array(where, owner, kInputNames[f + 1], 'i', 1, "int8");
  }
}

py::object step(PyScheduler& self, py::handle tokens, py::handle signals) {
  const auto held = lock(self);
  const int64_t rows = self.core.batch_size();
  HostArray inputs[7];
  inputs[0] = host_array("step", tokens, kInputNames[0], 'i', 8, "int64");
  StepInput in;
  if (signals.is_none() && rows == 0 && inputs[0].size == 0) {
    static const float no_signal = 0;
    static const int8_t no_status = 0;
    for (auto& p : in.signals) p = reinterpret_cast<const char*>(&no_signal);
    in.status = reinterpret_cast<const char*>(&no_status);
  } else {
    read_signals("step", signals, inputs + 1);
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
  return new_plan(std::move(data), self.core.layout() == Layout::kSlots);
}


struct PyStopTable {
  StopTable core;
  std::mutex busy;
};

// feed() releases the GIL: a second thread calling in meanwhile (add() growing the table under it)
// would be undefined behaviour, so every method takes the lock and says so out loud instead.
std::unique_lock<std::mutex> lock(PyStopTable& t) { return try_lock(t.busy, "StopTable"); }

// StopTable.feed: the arrays as Scheduler.step reads them, one per token fed.
py::array feed(PyStopTable& self, py::handle handles, py::handle tokens, py::handle signals) {
  const auto held = lock(self);
  HostArray inputs[8];
  inputs[0] = host_array("StopTable.feed", tokens, kInputNames[0], 'i', 8, "int64");
  read_signals("StopTable.feed", signals, inputs + 1);
  inputs[7] = host_array("StopTable.feed", handles, "handles", 'i', 8, "int64");
  const int64_t n = inputs[7].size;
  for (int f = 0; f < 7; ++f)
    if (inputs[f].size != n)
      throw std::invalid_argument(std::string("StopTable.feed: ") + kInputNames[f] + " must have shape (" +
                                  std::to_string(n) + ",) (one per handle), got (" + std::to_string(inputs[f].size) +
                                  ",)");
  FeedInput in;
  in.n = n;
  in.handles = inputs[7].data;
  in.handles_stride = inputs[7].stride;
  in.tokens = inputs[0].data;
  in.tokens_stride = inputs[0].stride;
  for (int f = 0; f < 5; ++f) {
    in.signals[f] = inputs[f + 1].data;
    in.signal_strides[f] = inputs[f + 1].stride;
  }
  in.status = inputs[6].data;
  in.status_stride = inputs[6].stride;
  py::array_t<int8_t> reasons(n);
  int8_t* out = reasons.mutable_data();
  {
    py::gil_scoped_release release;
    self.core.feed(in, out);
  }
  return std::move(reasons);
}

}  // namespace

void bind_scheduler(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const QueueFullError& e) {
      PyErr_SetString(g_queue_full != nullptr ? g_queue_full : PyExc_RuntimeError, e.what());
    }
  });

  m.def("scheduler_register_types", &register_types, py::arg("stop_reason"), py::arg("queue_full"),
        "Tells the native scheduler the Python StopReason enum and QueueFull exception (haltwise.scheduler).");
  add_plan_types(m);

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
             std::optional<int64_t> group, std::shared_ptr<StopRules> rules, std::optional<double> max_weight) {
            const auto held = lock(s);
            s.core.submit(request_id, max_new_tokens, priority, group, std::move(rules), max_weight);
          },
          py::arg("request_id"), py::arg("max_new_tokens"), py::arg("priority"), py::arg("group"), py::arg("rules"),
          py::arg("max_weight") = py::none())
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

  py::class_<PyStopTable>(m, "StopTable",
                          "Stop states fed by handle, for a caller that owns its batch (haltwise.integrations."
                          "vllm_rows). feed() returns one reason code per token: a StopReason value, 0 for none, "
                          "-1 for a token not fed (its entry had stopped).")
      .def(py::init<>())
      .def(
          "add",
          [](PyStopTable& t, std::shared_ptr<StopRules> rules, int64_t max_new_tokens) {
            const auto held = lock(t);
            return t.core.add(std::move(rules), max_new_tokens);
          },
          py::arg("rules"), py::arg("max_new_tokens"))
      .def(
          "remove",
          [](PyStopTable& t, int64_t handle) {
            const auto held = lock(t);
            t.core.remove(handle);
          },
          py::arg("handle"))
      .def(
          "num_tokens",
          [](PyStopTable& t, int64_t handle) {
            const auto held = lock(t);
            return t.core.num_tokens(handle);
          },
          py::arg("handle"))
      .def("feed", &feed, py::arg("handles"), py::arg("tokens"), py::arg("signals"))
      .def("__len__", [](PyStopTable& t) {
        const auto held = lock(t);
        return t.core.size();
      });
}

}  // namespace binding
}  // namespace haltwise
