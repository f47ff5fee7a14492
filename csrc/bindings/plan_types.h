// haltwise._core.StepPlan and haltwise._core.Finished: what Scheduler.step()
// returns. Plain CPython types (creating and reading pybind11 objects costs
// several times more, and a step returns one plan and reads a few records)
// whose arrays and lists are built on first access, one copy each, read-only.
// Python documents them: haltwise.StepPlan, haltwise.Finished.
#pragma once

#include <memory>

#include "common.h"
#include "scheduler.h"

namespace haltwise {
namespace binding {

// Creates the two types and adds them to `m` (once, at import).
void add_plan_types(py::module_& m);

// The Python StopReason member for each code (haltwise.scheduler registers
// its enum once); until then, reasons read as ints.
void set_stop_reasons(py::handle stop_reason);

// A new StepPlan owning `data`. Throws py::error_already_set.
py::object new_plan(std::unique_ptr<StepPlanData> data, bool slots);

}  // namespace binding
}  // namespace haltwise
