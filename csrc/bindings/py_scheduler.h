// haltwise._core.Scheduler, StopRules, StopTable, StepPlan and Finished (csrc/bindings/py_scheduler.cc).
#pragma once

#include <pybind11/pybind11.h>

namespace haltwise {
namespace binding {

void bind_scheduler(pybind11::module_& m);

}  // namespace binding
}  // namespace haltwise
