"""haltwise: stop LLM decoding early without losing accuracy.

Public names live here and nowhere else.
"""
from .policy import Policy, PolicyConfig
from .scheduler import Finished, QueueFull, Scheduler, StepPlan, StopConfig, StopReason
from .signals import BACKENDS, signals
from .signals_types import (
    MAX_TOP_K_CONF,
    STATUS_NAN,
    STATUS_NO_FINITE,
    STATUS_OK,
    STATUS_POSINF,
    Signals,
)
from .stepper import StepOutput, Stepper

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Finished",
    "MAX_TOP_K_CONF",
    "Policy",
    "PolicyConfig",
    "QueueFull",
    "STATUS_NAN",
    "STATUS_NO_FINITE",
    "STATUS_OK",
    "STATUS_POSINF",
    "Scheduler",
    "Signals",
    "StepOutput",
    "StepPlan",
    "Stepper",
    "StopConfig",
    "StopReason",
    "signals",
]
