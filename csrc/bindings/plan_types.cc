#include "plan_types.h"

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace haltwise {
namespace binding {
namespace {

// StopReason members by code, strong references kept for the life of the process.
PyObject* g_stop_reasons[kNumStopReasons] = {};
PyTypeObject* g_finished_type = nullptr;
PyTypeObject* g_plan_type = nullptr;

PyObject* new_reason(StopReason reason) {  // new reference
  PyObject* member = reason == StopReason::kNone ? Py_None : g_stop_reasons[static_cast<int>(reason)];
  if (member == nullptr) return PyLong_FromLong(static_cast<int>(reason));
  Py_INCREF(member);
  return member;
}

// *slot, built by `build` on first access; returns a new reference.
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
  PyErr_Format(PyExc_TypeError, "%s objects come from Scheduler.step(), not from a constructor",
               type->tp_name);
  return nullptr;
}

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

// Deallocates an instance of a heap type made by make_type().
void free_instance(PyObject* self) {
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);  // instances of heap types hold a reference to their type
}

// ---- Finished --------------------------------------------------------------------

struct FinishedObject {
  PyObject_HEAD
  FinishedRecord* record;  // owned; never null
  PyObject* tokens;        // cached array
  PyObject* signals;       // cached dict
};

const FinishedRecord& record_of(PyObject* self) { return *reinterpret_cast<FinishedObject*>(self)->record; }

void finished_dealloc(PyObject* self) {
  auto* f = reinterpret_cast<FinishedObject*>(self);
  delete f->record;
  Py_XDECREF(f->tokens);
  Py_XDECREF(f->signals);
  free_instance(self);
}

PyObject* finished_tokens(PyObject* self, void*) {
  auto* f = reinterpret_cast<FinishedObject*>(self);
  return cached(&f->tokens,
                [f] { return read_only_array(f->record->summary.tokens.data(), f->record->summary.tokens.size()); });
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
  return guarded([self] {
    const FinishedRecord& r = record_of(self);
    const std::string text = "Finished(request_id=" + std::to_string(r.request_id) + ", reason=" +
                             stop_reason_name(r.reason) + ", num_tokens=" + std::to_string(r.summary.num_tokens) +
                             (r.group ? ", group=" + std::to_string(*r.group) : std::string()) + ")";
    return PyUnicode_FromString(text.c_str());
  });
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

// A new Finished holding `record`, or nullptr with a Python error set (then
// `record` is left as it was).
PyObject* new_finished(FinishedRecord& record) {
  return guarded([&record] {
    auto owned = std::make_unique<FinishedRecord>(std::move(record));
    auto* f = PyObject_New(FinishedObject, g_finished_type);
    if (f == nullptr) {
      record = std::move(*owned);
      return static_cast<PyObject*>(nullptr);
    }
    f->record = owned.release();
    f->tokens = nullptr;
    f->signals = nullptr;
    return reinterpret_cast<PyObject*>(f);
  });
}

// ---- StepPlan ----------------------------------------------------------------------

struct PlanObject {
  PyObject_HEAD
  StepPlanData* data;  // owned; never null
  bool slots;
  PyObject *finished, *keep, *admitted, *request_ids, *positions, *active, *free_slots;  // built on first access
};

PlanObject* plan_of(PyObject* self) { return reinterpret_cast<PlanObject*>(self); }

void plan_dealloc(PyObject* self) {
  PlanObject* p = plan_of(self);
  delete p->data;
  for (PyObject* o : {p->finished, p->keep, p->admitted, p->request_ids, p->positions, p->active, p->free_slots})
    Py_XDECREF(o);
  free_instance(self);
}

PyObject* plan_finished(PyObject* self, void*) {
  PlanObject* p = plan_of(self);
  if (p->finished == nullptr) {
    std::vector<FinishedRecord>& records = p->data->finished;
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(records.size()));
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < records.size(); ++i) {
      PyObject* item = new_finished(records[i]);
      if (item == nullptr) {
        // The records moved into the list so far go with it: keep none, so
        // that a retry cannot hand out moved-from records.
        Py_DECREF(list);
        records.clear();
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
  return guarded([self] {
    PlanObject* p = plan_of(self);
    const size_t finished = p->finished != nullptr ? static_cast<size_t>(PyList_GET_SIZE(p->finished))
                                                   : p->data->finished.size();
    const std::string text = "StepPlan(finished=" + std::to_string(finished) + ", keep=" +
                             std::to_string(p->data->keep.size()) + ", admitted=" +
                             std::to_string(p->data->admitted.size()) + ", next_batch=" +
                             std::to_string(p->data->request_ids.size()) + ")";
    return PyUnicode_FromString(text.c_str());
  });
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

}  // namespace

void add_plan_types(py::module_& m) {
  g_finished_type = make_type("haltwise._core.Finished", "A sequence that ended (haltwise.Finished documents the fields).",
                              sizeof(FinishedObject), finished_dealloc, g_finished_getset, finished_repr);
  g_plan_type = make_type("haltwise._core.StepPlan", "What the caller does before the next step (haltwise.StepPlan "
                          "documents the fields).", sizeof(PlanObject), plan_dealloc, g_plan_getset, plan_repr);
  m.attr("Finished") = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_finished_type));
  m.attr("StepPlan") = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(g_plan_type));
}

void set_stop_reasons(py::handle stop_reason) {
  for (int code = 1; code < kNumStopReasons; ++code) {
    py::object member = stop_reason(code);
    Py_XDECREF(g_stop_reasons[code]);
    g_stop_reasons[code] = member.release().ptr();
  }
}

py::object new_plan(std::unique_ptr<StepPlanData> data, bool slots) {
  auto* plan = PyObject_New(PlanObject, g_plan_type);
  if (plan == nullptr) throw py::error_already_set();
  plan->data = data.release();
  plan->slots = slots;
  plan->finished = plan->keep = plan->admitted = plan->request_ids = plan->positions = plan->active =
      plan->free_slots = nullptr;
  return py::reinterpret_steal<py::object>(reinterpret_cast<PyObject*>(plan));
}

}  // namespace binding
}  // namespace haltwise
