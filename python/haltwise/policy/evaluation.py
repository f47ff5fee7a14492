"""The pure part of a bucket's evaluation: from the certified sets of one
test (anytime.Certifier over anytime.policy_families) and the window's mean
tokens, which candidates the normal and overload modes target. No state is
changed here; policy.py applies the :class:`Evaluation` (ramps, audit,
persistence)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

# A strategy (or the overload trace count) changes only for a gain this large (relative): no flapping.
FAMILY_MARGIN = 0.05


@dataclass(frozen=True)
class OverloadChoice:
    """The overload target: strategy row `row` (`traces` traces) at grid
    index `index` (-1: no cut); `certified`: the grid indices it certified."""

    row: int
    traces: int
    index: int
    certified: list[int]
    gain: float


@dataclass(frozen=True)
class Evaluation:
    """rows: certified grid indices per normal strategy row (row 0's list
    leaves out its "no cut", the uncut run itself; an exact strategy's
    always holds its "no cut", -1); target_row, target: the
    normal target; overload: the overload target (None: none certified)."""

    rows: dict[int, list[int]]
    target_row: int
    target: int
    overload: OverloadChoice | None = None
    guard: dict | None = field(default=None)


def normal_rows(sets: Mapping[str, Sequence[int]]) -> dict[int, list[int]]:
    """Certified grid indices per strategy row from the families' sets
    ("normal": row 0's grid indices; "normal/<r>": row r's columns, 0 = no cut)."""
    rows = {0: [int(c) for c in sets["normal"]]}
    for name, cols in sets.items():
        if name.startswith("normal/"):
            rows[int(name.split("/")[1])] = [int(c) - 1 for c in cols]
    return rows


def choose(sets: Mapping[str, Sequence[int]], *, gain: Callable[[int, int], float], in_force: tuple[int, int],
           strategy_rows: Sequence, trace_options: Sequence[int], overload_row: int,
           guard: dict | None) -> Evaluation:
    """The targets of one evaluation.

    gain(row, column): higher is better (minus mean tokens, or the value);
    in_force: the normal (strategy row, grid index) in force;
    strategy_rows, trace_options: config.strategy_rows and config.trace_options;
    overload_row: the overload strategy row targeted so far (hysteresis);
    guard: the user-report guard's finding, if it fired: then only the
        candidates of the row in force below the value in force remain."""
    rows = normal_rows(sets)
    for r in rows:  # a DeepConf warm-up strategy sets its own threshold per problem: only its column 0 is real
        if getattr(strategy_rows[r], "warmup", 0):
            rows[r] = [c for c in rows[r] if c == -1]
    # an exact strategy with no cut (unbeatable, all K traces, row 0's weighting) gives the uncut vote itself:
    # its EM drop is 0 by construction, so it needs no certificate and, like row 0's "no cut", is always a
    # candidate (it still saves the traces that could no longer change the vote)
    exact = [r for r in rows if r and strategy_rows[r].same_vote_as(strategy_rows[0])]
    row_now, index_now = in_force
    if guard is not None:  # step back: only the candidates of the row in force below the value in force
        below = [c for c in rows.get(row_now, []) if c < index_now]
        rows = {0: [], row_now: below}  # (row_now may be 0 itself)
    for r in exact:
        rows[r] = sorted(set(rows.get(r, [])) | {-1})
    pairs = [(0, -1)] + [(r, c) for r, cs in rows.items() for c in cs]

    def score(rc: tuple[int, int]) -> tuple[float, int]:
        return gain(rc[0], rc[1] + 1), rc[1]

    best = max(pairs, key=score)
    mine = [rc for rc in pairs if rc[0] == row_now]
    if mine and best[0] != row_now:
        kept = max(mine, key=score)
        if score(best)[0] - score(kept)[0] < FAMILY_MARGIN * abs(score(kept)[0]):
            best = kept  # change the strategy only for a clear gain
    choices = []
    for r, strategy in enumerate(strategy_rows):
        cols = sets[f"overload/{trace_options[r]}" if r < len(trace_options) else f"overload/s{r}"]
        if strategy.warmup:
            cols = [c for c in cols if c == 0]
        if cols:
            c = max(cols, key=lambda c: (gain(r, c), c))
            choices.append(OverloadChoice(row=r, traces=strategy.traces, index=int(c) - 1,
                                          certified=[int(col) - 1 for col in cols], gain=gain(r, c)))
    overload = max(choices, default=None, key=lambda o: o.gain)
    current = next((o for o in choices if o.row == overload_row), None)
    if overload is not None and current is not None and overload is not current and \
            overload.gain - current.gain < FAMILY_MARGIN * abs(current.gain):
        overload = current  # switch the overload strategy only for a clear gain
    return Evaluation(rows=rows, target_row=best[0], target=best[1], overload=overload, guard=guard)


def token_gain(tokens: np.ndarray) -> Callable[[int, int], float]:
    """gain(row, column) = minus the mean tokens of that candidate."""
    return lambda r, c: -float(tokens[r, c])
