"""Overload detection with hysteresis.

Each call of :meth:`LoadMonitor.observe` is one *observation* of the serving
figures (call it at a steady cadence, e.g. every second or every N
admissions). A figure left out (None) or without an SLO is ignored.

An observation is
  *hot*  when some figure is above its SLO,
  *calm* when every figure is below ``exit_fraction`` x its SLO,
  *neutral* otherwise (between the two lines).

State machine (two states, NORMAL and OVERLOAD):
  NORMAL -> OVERLOAD after ``enter_after`` consecutive hot observations;
  OVERLOAD -> NORMAL after ``exit_after`` consecutive calm observations, and
  not before ``min_dwell`` observations have passed since entering.
A neutral observation breaks both streaks. The gap between the two lines
(the SLO and exit_fraction x SLO), the streaks and the dwell time are the
hysteresis: a figure hovering at the SLO cannot flip the state back and
forth; the fastest possible cycle is enter_after + max(min_dwell, exit_after)
observations.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

FIGURES = ("queue_depth", "p95_latency_s", "kv_utilization")


@dataclass
class LoadState:
    overload: bool = False
    hot_streak: int = 0
    calm_streak: int = 0
    since_switch: int = 0  # observations since the last switch
    observations: int = 0
    last: dict | None = None  # the figures of the last observation

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoadState":
        return cls(**data)


class LoadMonitor:
    """Hysteresis over serving figures (module docstring).

    slos: figure name -> SLO (None or missing: that figure is ignored).
    """

    def __init__(self, slos: dict[str, float | None], *, exit_fraction: float, enter_after: int, exit_after: int,
                 min_dwell: int, state: LoadState | None = None):
        unknown = sorted(set(slos) - set(FIGURES))
        if unknown:
            raise ValueError(f"LoadMonitor: slos keys must be in {FIGURES}, got {unknown}")
        self.slos = {name: float(v) for name, v in slos.items() if v is not None}
        self.exit_fraction = exit_fraction
        self.enter_after = enter_after
        self.exit_after = exit_after
        self.min_dwell = min_dwell
        self.state = state or LoadState()

    def classify(self, figures: dict[str, float | None]) -> str:
        """'hot', 'calm' or 'neutral' for one observation."""
        seen = {name: v for name, v in figures.items() if v is not None and name in self.slos}
        if any(v > self.slos[name] for name, v in seen.items()):
            return "hot"
        if all(v < self.exit_fraction * self.slos[name] for name, v in seen.items()):
            return "calm"
        return "neutral"

    def observe(self, **figures: float | None) -> tuple[bool, bool]:
        """One observation. Returns (overload now, whether the state switched)."""
        unknown = sorted(set(figures) - set(FIGURES))
        if unknown:
            raise ValueError(f"observe_load: figures must be among {FIGURES}, got {unknown}")
        for name, value in figures.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"observe_load: {name} must be a finite number >= 0 or None, got {value!r}")
        s = self.state
        kind = self.classify(figures)
        s.observations += 1
        s.since_switch += 1
        s.hot_streak = s.hot_streak + 1 if kind == "hot" else 0
        s.calm_streak = s.calm_streak + 1 if kind == "calm" else 0
        s.last = {name: (None if v is None else float(v)) for name, v in figures.items()}
        switched = False
        if not s.overload and s.hot_streak >= self.enter_after:
            s.overload, switched = True, True
        elif s.overload and s.calm_streak >= self.exit_after and s.since_switch >= self.min_dwell:
            s.overload, switched = False, True
        if switched:
            s.since_switch = 0
            s.hot_streak = s.calm_streak = 0
        return s.overload, switched
