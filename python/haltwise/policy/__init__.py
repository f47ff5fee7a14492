"""The policy layer: chooses stop thresholds per request inside an accuracy
budget, from warm-up calibration, a control slice replayed under every
candidate, EM feedback and load figures; persists in SQLite.

Where a threshold moves: policy.py (the facade; types.py its Plan and
TraceOutcome), evaluation.py (the choice of targets), ltt.py (the test),
calibration.py (candidates and replay), buckets.py (fallback), load.py
(overload hysteresis), store.py (SQLite), shadow.py, cost.py; replay.py is the
offline harness (`haltwise replay`), cli.py the `haltwise policy` commands.
"""
from .config import PolicyConfig
from .policy import Policy
from .types import Plan, TraceOutcome
from .store import PolicyDatabaseError

__all__ = ["Plan", "Policy", "PolicyConfig", "PolicyDatabaseError", "TraceOutcome"]
