"""Anytime-valid certification: the re-test schedule of a bucket's test.

The policy re-tests a bucket as labelled control evidence arrives. Each test
(ltt.py) is valid at its own level, but a stream of fresh level-delta tests
is not: the chance that *some* evaluation certifies a candidate whose EM drop
exceeds epsilon grows with the number of evaluations. This module makes the
guarantee hold over the whole stream:

    P(the bucket ever certifies -- and so ever puts in force -- a candidate
      whose EM drop exceeds epsilon) <= delta.

Method: alpha-spending over a pre-set schedule of checkpoints.

* Checkpoints are fixed in advance on the count L of labelled control
  requests the bucket has seen since its grid froze: c_1 = ``first``, then
  geometric, c_{j+1} = max(c_j + 1, ceil(ratio * c_j)), until the evidence
  window is full (c_j >= ``window``), then every ``window // 2`` labels.
* The j-th checkpoint tests at level delta_j = delta * 6 / (pi^2 j^2)
  (sum over j = delta: the Basel series).
* Only a checkpoint may *add* a candidate to the certified set. A candidate
  keeps the level of the checkpoint that added it (its certificate level).
  Every evaluation -- at a checkpoint or between them (every
  ``evaluate_every`` pieces of evidence) -- re-runs each family at the
  certificate levels it holds and keeps a held candidate only while the
  current window still certifies it at its own level; a checkpoint then
  adds what its own test certifies, at its level. So re-tests can lower the
  value in force (drift, a window that turned), never raise it beyond what
  some checkpoint certified; and a candidate is not lost merely because a
  later checkpoint spends a smaller level on a window that cannot grow past
  ``window`` (were each checkpoint to replace the set, the certified sets
  would shrink as delta_j falls). When several checkpoints are passed at once
  (labels arriving in bulk) the last one reached is tested, at its own
  level (the skipped levels are simply not spent).

Proof sketch. Let A_j be the event that the test at checkpoint j certifies a
violator. Under the assumptions below the window used at checkpoint j is an
i.i.d. sample of the bucket's paired differences whose size does not depend
on their values, so P(A_j) <= delta_j (ltt.py: each chain design is a level
delta_j family-wise test). Every candidate the policy ever holds was
certified by some checkpoint (re-tests only remove; how long a candidate is
kept does not enter the argument), and the value in force is always in the
current certified set, so {ever in force a violator} is contained in the
union of the A_j, whose probability is at most sum_j delta_j = delta. The
same argument applies to the overload test with epsilon_overload (its trace
families split delta_j by weighted Bonferroni).

Assumptions: the control slice is a random sample of the bucket's traffic,
which is stationary (i.i.d. requests) over the stream; which control
requests get labelled, and when, does not depend on their paired
differences (missing at random; ``unlabeled="worst_case"`` removes the
selection part); labels are truthful; replay is exact (notes/policy.md).

The same :class:`Certifier` object drives the policy (policy.py) and the
simulator (simulate.py, ``haltwise policy simulate``), which also runs the
naive rule (``RetestSchedule(every=5, spending="none")``: a fresh level-delta
test every 5 labels) to show that the simulator can fail.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from . import ltt

SPENDINGS = ("basel", "none")
_BASEL = 6.0 / (math.pi ** 2)


@dataclass(frozen=True)
class RetestSchedule:
    """Pre-set checkpoints on the labelled-evidence count and their levels.

    first: labelled control requests at the first checkpoint (>= 1)
    ratio: geometric growth of the checkpoints until the window is full (> 1)
    window: the evidence window; past it, a checkpoint every window // 2 labels
    delta: the total error budget
    spending: "basel" (delta_j = delta 6 / (pi^2 j^2), anytime-valid) or
        "none" (delta at every checkpoint: NOT anytime-valid; the naive rule,
        for the simulator only)
    every: if set, checkpoints every this many labels from ``first`` instead
        of the geometric schedule (the naive rule)
    """

    first: int
    ratio: float = 1.5
    window: int = 1000
    delta: float = 0.1
    spending: str = "basel"
    every: Optional[int] = None

    def __post_init__(self):
        for name, value, low in (("first", self.first, 1), ("window", self.window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"RetestSchedule: {name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.ratio, (int, float)) or not self.ratio > 1.0:
            raise ValueError(f"RetestSchedule: ratio must be a number > 1, got {self.ratio!r}")
        if not isinstance(self.delta, (int, float)) or not 0.0 < self.delta < 1.0:
            raise ValueError(f"RetestSchedule: delta must be in (0, 1), got {self.delta!r}")
        if self.spending not in SPENDINGS:
            raise ValueError(f"RetestSchedule: spending must be one of {SPENDINGS}, got {self.spending!r}")
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):
            raise ValueError(f"RetestSchedule: every must be None or an int >= 1, got {self.every!r}")

    def level(self, j: int) -> float:
        """Test level of checkpoint j (1-based)."""
        if j < 1:
            raise ValueError(f"RetestSchedule.level: j must be >= 1, got {j}")
        if self.spending == "none":
            return self.delta
        return self.delta * _BASEL / (j * j)

    @functools.cached_property
    def _points(self) -> tuple[int, ...]:
        points = [self.first]
        while points[-1] < self.window:
            points.append(max(points[-1] + 1, math.ceil(self.ratio * points[-1])))
        return tuple(points)

    def checkpoint(self, j: int) -> int:
        """Labelled-evidence count at checkpoint j (1-based)."""
        if j < 1:
            raise ValueError(f"RetestSchedule.checkpoint: j must be >= 1, got {j}")
        if self.every is not None:
            return self.first + (j - 1) * self.every
        points = self._points
        if j <= len(points):
            return points[j - 1]
        return points[-1] + (j - len(points)) * max(1, self.window // 2)

    def reached(self, labelled: int) -> int:
        """How many checkpoints a bucket with `labelled` labels has passed."""
        if labelled < self.first:
            return 0
        if self.every is not None:
            return 1 + (labelled - self.first) // self.every
        points = self._points
        if labelled < points[-1]:
            return sum(p <= labelled for p in points)
        return len(points) + (labelled - points[-1]) // max(1, self.window // 2)


@dataclass
class AnytimeState:
    """What a bucket keeps between evaluations (persisted with the bucket)."""

    labelled: int = 0  # labelled control requests seen since the grid froze
    checkpoints: int = 0  # checkpoints tested so far (j of the last one)
    sets: dict[str, list[int]] = field(default_factory=dict)  # family -> candidates held (added by a checkpoint)
    since: dict[str, list[int]] = field(default_factory=dict)  # family -> the checkpoint j that added each one

    def to_dict(self) -> dict:
        return {"labelled": self.labelled, "checkpoints": self.checkpoints,
                "sets": {k: list(v) for k, v in self.sets.items()},
                "since": {k: list(v) for k, v in self.since.items()}}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "AnytimeState":
        if not data:
            return cls()
        sets = {str(k): [int(i) for i in v] for k, v in data["sets"].items()}
        # a state stored before certificate levels were kept: its candidates came from the last checkpoint
        since = data.get("since") or {k: [int(data["checkpoints"])] * len(v) for k, v in sets.items()}
        return cls(labelled=int(data["labelled"]), checkpoints=int(data["checkpoints"]), sets=sets,
                   since={str(k): [int(j) for j in v] for k, v in since.items()})

    def held(self, name: str) -> dict[int, int]:
        """Family `name`'s candidates -> the checkpoint that certified each."""
        return dict(zip(self.sets.get(name, []), self.since.get(name, [])))


# A family: level -> the candidates it certifies at that level (increasing indices).
Family = Callable[[float], list]


def chain_family(harms: Sequence[int], helps: Sequence[int], n: int, *, epsilon: float, test: str, starts: int,
                 share: float = 1.0) -> Family:
    """The fixed-sequence chain design of ltt.certified_set over one ordered
    candidate list, as a function of the level (it runs at ``share`` x level)."""
    return lambda level: ltt.certified_set(harms, helps, n, epsilon=epsilon, delta=level * share, test=test,
                                           starts=starts)


def policy_families(config, harms, helps, n: int, test: str) -> dict[str, Family]:
    """The policy's families of tests over one evidence window (policy.py uses
    exactly these). harms, helps: (R, G + 1) counts per strategy row r
    (config.strategy_rows: row 0 = all K traces at once, then the fewer-trace
    options, then the consensus strategies) and candidate (column 0: no cut,
    column j + 1: grid index j).

    Normal mode, at epsilon, Bonferroni over the paths (equal shares):
    "normal" (row 0's grid, ``chain_starts`` chains; its "no cut" is the
    uncut run itself) and "normal/<r>" per row of config.normal_rows --
    the fewer-trace options when ``fewer_traces="always"``, then each
    consensus strategy (its columns from "no cut" up, one chain). Overload, at epsilon_overload:
    "overload/<K'>" every column of trace option K' and "overload/s<r>"
    every column of consensus strategy r, weighted Bonferroni (a
    fewer-traces family weighs 2, the all-traces and consensus families 1;
    those but the all-traces one are single chains from "no cut")."""
    options = config.trace_options
    consensus_rows = range(len(options), len(config.strategy_rows))
    normal_rows = config.normal_rows
    share = 1.0 / (1 + len(normal_rows))
    families = {"normal": chain_family(harms[0][1:], helps[0][1:], n, epsilon=config.epsilon, test=test,
                                       starts=config.chain_starts, share=share)}
    for r in normal_rows:  # fewer traces (with fewer_traces="always"), then the consensus strategies
        families[f"normal/{r}"] = chain_family(harms[r], helps[r], n, epsilon=config.epsilon, test=test, starts=1,
                                               share=share)
    weights = [1.0 if k == config.traces else 2.0 for k in options] + [1.0] * len(consensus_rows)
    for r, k in enumerate(options):
        families[f"overload/{k}"] = chain_family(harms[r], helps[r], n, epsilon=config.epsilon_overload, test=test,
                                                 starts=config.chain_starts if k == config.traces else 1,
                                                 share=weights[r] / sum(weights))
    for r in consensus_rows:
        families[f"overload/s{r}"] = chain_family(harms[r], helps[r], n, epsilon=config.epsilon_overload, test=test,
                                                  starts=1, share=weights[r] / sum(weights))
    return families


class Certifier:
    """Applies a :class:`RetestSchedule` to a bucket's families of tests."""

    def __init__(self, schedule: RetestSchedule):
        if not isinstance(schedule, RetestSchedule):
            raise TypeError(f"Certifier: schedule must be a RetestSchedule, got {type(schedule).__name__}")
        self.schedule = schedule

    def evaluate(self, state: AnytimeState, families: Mapping[str, Family]) -> tuple[dict[str, list[int]], bool]:
        """One evaluation at ``state.labelled`` labels. Returns (certified
        candidates per family, whether this evaluation was a checkpoint).
        Updates `state` at a checkpoint."""
        reached = self.schedule.reached(state.labelled)
        checkpoint = reached > state.checkpoints
        if not checkpoint and state.checkpoints == 0:
            return {name: [] for name in families}, False
        out, since = {}, {}
        for name, family in families.items():
            held = state.held(name)
            kept: dict[int, int] = {}
            for j in sorted(set(held.values())):  # each held candidate re-tested at its own certificate level
                passing = set(int(c) for c in family(self.schedule.level(j)))
                kept.update((c, j) for c, cj in held.items() if cj == j and c in passing)
            if checkpoint:  # the full test at the new checkpoint's level: it may add candidates
                for c in family(self.schedule.level(reached)):
                    kept.setdefault(int(c), reached)
            out[name] = sorted(kept)
            since[name] = [kept[c] for c in out[name]]
        if checkpoint:  # between checkpoints the held sets stay: a candidate that fails a re-test may pass the next
            state.checkpoints = reached
            state.sets = {name: list(v) for name, v in out.items()}
            state.since = since
        return out, checkpoint
