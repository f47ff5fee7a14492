"""The trace bank: K uncut traces per problem with their per-token signals and
extracted answers, stored compactly (npz, signals in float16), so stop rules
and policies can be evaluated offline in seconds by replaying where each
trace would have been cut.

Replay is exact up to the float16 rounding of the stored signals: a cut is a
deterministic function of a trace's signals, and the decode loop keys its
sampling noise by (request, position), so a cut trace is a prefix of the
uncut one stored here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .trace_rules import first_cut_step, oriented_signal, vote_weight

SIGNALS = ("topk_conf", "logprob", "entropy", "confidence", "margin")
BUNDLED_BANK = Path(__file__).resolve().parent / "data" / "arith_bank.npz"  # written by `haltwise record`
NO_ANSWER = np.iinfo(np.int64).min  # stored in `answers` where a trace gave no parseable answer


@dataclass
class TraceBank:
    """P problems x K traces.

    references: int64 (P,)     the correct answer of each problem
    difficulty: int64 (P,)     a task-defined difficulty (e.g. number of terms)
    answers:    int64 (P, K)   extracted answers (NO_ANSWER where none)
    reasons:    int8  (P, K)   StopReason of each uncut trace (EOS, MAX_TOKENS, ...)
    lengths:    int32 (P, K)   generated tokens
    offsets:    int64 (P*K+1,) trace (p, k) owns signals[name][offsets[p*K+k]:offsets[p*K+k+1]]
    signals:    name -> float16 (total_tokens,)
    meta:       free-form JSON metadata (model, temperature, seed, command)
    """

    references: np.ndarray
    difficulty: np.ndarray
    answers: np.ndarray
    reasons: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    signals: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    @property
    def num_problems(self) -> int:
        return self.answers.shape[0]

    @property
    def traces_per_problem(self) -> int:
        return self.answers.shape[1]

    @property
    def correct(self) -> np.ndarray:
        """bool (P, K): the trace's answer equals the reference."""
        return self.answers == self.references[:, None]

    def signal(self, p: int, k: int, name: str) -> np.ndarray:
        """float32 (lengths[p, k],) per-token values of one signal of one trace;
        name may also be "neg_entropy" (the oriented entropy the rules use)."""
        i = p * self.traces_per_problem + k
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return oriented_signal({key: values[lo:hi] for key, values in self.signals.items()}, name, np.float32)

    def save(self, path: str | Path) -> None:
        arrays: dict[str, Any] = dict(references=self.references, difficulty=self.difficulty, answers=self.answers,
                      reasons=self.reasons, lengths=self.lengths, offsets=self.offsets,
                      meta=np.array(json.dumps(self.meta)))
        arrays.update({f"signal_{name}": values for name, values in self.signals.items()})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez_compressed would append .npz to a str path
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "TraceBank":
        """Read a bank saved by :meth:`save`. Every array is checked (names,
        dtypes, shapes, offsets against lengths and the signal arrays), so a
        damaged or tampered file raises ValueError naming the path and what
        is wrong rather than replaying garbage."""
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"TraceBank.load: {path} is not a trace bank (not an npz file: {e})") from None
        with data:
            required = ["references", "difficulty", "answers", "reasons", "lengths", "offsets", "meta",
                        *(f"signal_{name}" for name in SIGNALS)]
            missing = [name for name in required if name not in data.files]
            if missing:
                raise ValueError(f"TraceBank.load: {path} is not a trace bank (missing {sorted(missing)})")
            try:
                arrays = {name: data[name] for name in required}
                meta = json.loads(str(arrays.pop("meta")))
            except (OSError, ValueError) as e:
                raise ValueError(f"TraceBank.load: {path} is damaged ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"TraceBank.load: {path}: meta must be a JSON object, got {type(meta).__name__}")
        bank = cls(references=arrays["references"], difficulty=arrays["difficulty"], answers=arrays["answers"],
                   reasons=arrays["reasons"], lengths=arrays["lengths"], offsets=arrays["offsets"],
                   signals={name: arrays[f"signal_{name}"] for name in SIGNALS}, meta=meta)
        problem = bank.validate()
        if problem:
            raise ValueError(f"TraceBank.load: {path} is not a consistent trace bank: {problem}")
        return bank

    def validate(self) -> str | None:
        """None if the arrays are consistent, else what is wrong (one line)."""
        def kind(a) -> str:
            return f"{a.dtype} {tuple(a.shape)}"

        for name in ("references", "difficulty", "answers", "reasons", "lengths", "offsets"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
                return f"{name} must be an integer array, got {kind(a) if isinstance(a, np.ndarray) else type(a)}"
        if self.answers.ndim != 2:
            return f"answers must be (problems, traces), got {kind(self.answers)}"
        P, K = self.answers.shape
        for name, shape in (("references", (P,)), ("difficulty", (P,)), ("reasons", (P, K)), ("lengths", (P, K)),
                            ("offsets", (P * K + 1,))):
            if getattr(self, name).shape != shape:
                return f"{name} must have shape {shape} (answers is {(P, K)}), got {kind(getattr(self, name))}"
        if (self.lengths < 0).any():
            return f"lengths must be >= 0, got {int(self.lengths.min())}"
        if self.offsets[0] != 0:
            return f"offsets[0] must be 0, got {int(self.offsets[0])}"
        steps = np.diff(self.offsets.astype(np.int64))
        bad = np.flatnonzero(steps != self.lengths.reshape(-1).astype(np.int64))
        if bad.size:
            i = int(bad[0])
            return (f"offsets must be the running sum of lengths: trace {i} (problem {i // max(K, 1)}, trace "
                    f"{i % max(K, 1)}) spans offsets[{i}:{i + 2}] = {self.offsets[i:i + 2].tolist()} but has "
                    f"length {int(self.lengths.reshape(-1)[i])}")
        total = int(self.offsets[-1])
        for name in SIGNALS:
            values = self.signals.get(name)
            if values is None:
                return f"signal {name!r} is missing"
            if values.ndim != 1 or values.dtype.kind != "f" or len(values) != total:
                return f"signal {name} must be float ({total},) (offsets[-1]), got {kind(values)}"
        from .scheduler import StopReason

        valid = np.array([int(r) for r in StopReason])
        if not np.isin(self.reasons, valid).all():
            bad_reason = self.reasons[~np.isin(self.reasons, valid)].reshape(-1)[0]
            return f"reasons must be StopReason values {valid.tolist()}, got {int(bad_reason)}"
        return None

    @classmethod
    def from_traces(cls, references: Sequence[int], difficulty: Sequence[int],
                    traces: Sequence[Sequence[dict]], meta: dict | None = None) -> "TraceBank":
        """traces[p][k]: dict with "answer" (int | None), "reason" (int), and
        float arrays for every name in SIGNALS (one value per generated token)."""
        P, K = len(traces), len(traces[0])
        if any(len(row) != K for row in traces):
            raise ValueError("TraceBank.from_traces: every problem needs the same number of traces")
        answers = np.full((P, K), NO_ANSWER, dtype=np.int64)
        reasons = np.zeros((P, K), dtype=np.int8)
        lengths = np.zeros((P, K), dtype=np.int32)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in SIGNALS}
        for p, row in enumerate(traces):
            for k, t in enumerate(row):
                if t["answer"] is not None:
                    answers[p, k] = t["answer"]
                reasons[p, k] = int(t["reason"])
                lengths[p, k] = len(t[SIGNALS[0]])
                for name in SIGNALS:
                    parts[name].append(np.asarray(t[name], dtype=np.float16))
        offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1), dtype=np.int64)])
        return cls(references=np.asarray(references, dtype=np.int64), difficulty=np.asarray(difficulty, dtype=np.int64),
                   answers=answers, reasons=reasons, lengths=lengths, offsets=offsets,
                   signals={name: np.concatenate(parts[name]) if parts[name] else np.zeros(0, np.float16)
                            for name in SIGNALS},
                   meta=dict(meta or {}))


def window_means(values: np.ndarray, window: int) -> np.ndarray:
    """float64 (n,): at each token t (1-based count n = t + 1), the mean of the
    last min(n, window) values -- the scheduler's group confidence."""
    values = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    n = np.arange(1, len(values) + 1)
    lo = np.maximum(n - window, 0)
    return (csum[n] - csum[lo]) / (n - lo)


def _evaluated_means(values: np.ndarray, window: int, min_new_tokens: int, last_evaluated: bool) -> np.ndarray:
    """Window means at the steps where the scheduler evaluates the confidence
    rules: n >= max(1, min_new_tokens), and not the last token of a trace that
    a token rule ended (EOS, stop sequence, max tokens fire before them)."""
    means = window_means(values, window)
    end = len(means) if last_evaluated else len(means) - 1
    return means[max(1, min_new_tokens) - 1: end]


def cut_length(values: np.ndarray, threshold: float, *, window: int, min_new_tokens: int,
               last_evaluated: bool = False) -> int | None:
    """The token count at which LOW_CONFIDENCE would cut a trace with these
    per-token values (oriented: higher = more confident), or None if never:
    the first evaluated n whose window mean < threshold. `values` is a whole
    uncut trace whose last token ended it (last_evaluated=False), as in a bank.
    The same rule as :meth:`haltwise.policy.calibration.TraceProfile.cut_length`
    (:func:`haltwise.trace_rules.first_cut_step`)."""
    means = _evaluated_means(values, window, min_new_tokens, last_evaluated)
    running = np.minimum.accumulate(means) if means.size else means
    return first_cut_step(running, max(1, min_new_tokens) - 1, threshold)


def lowest_window_mean(values: np.ndarray, *, window: int, min_new_tokens: int, last_evaluated: bool = False) -> float:
    """min over the evaluated steps of the window mean (NaN if none): a
    threshold t cuts the trace iff this is < t; the scheduler's
    Finished.min_window_mean of the same trace."""
    means = _evaluated_means(values, window, min_new_tokens, last_evaluated)
    return float(means.min()) if means.size else math.nan


@dataclass
class ReplayOutcome:
    """What a stop rule would have done on a bank: per problem, tokens spent
    and whether the vote was right; the total over the bank."""

    tokens: np.ndarray  # int64 (P,)
    correct: np.ndarray  # bool (P,)

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def em(self) -> float:
        return float(self.correct.mean())


def replay_warmup_cut(bank: TraceBank, *, warmup: int, keep_percent: float, signal: str, window: int,
                      min_new_tokens: int | None = None, weighting: str = "majority",
                      traces: int | None = None) -> ReplayOutcome:
    """DeepConf online on the bank: per problem, the first `warmup` traces run
    uncut and set the threshold (voting.warmup_threshold of their lowest
    window means); every later trace is cut where LOW_CONFIDENCE would cut it
    and then does not vote. warmup=0 replays the uncut run. Uses the first
    `traces` traces of each problem (default all)."""
    from .voting import warmup_threshold, weighted_vote

    K = traces or bank.traces_per_problem
    min_new = window if min_new_tokens is None else min_new_tokens
    tokens = np.zeros(bank.num_problems, dtype=np.int64)
    correct = np.zeros(bank.num_problems, dtype=bool)
    for p in range(bank.num_problems):
        values = [bank.signal(p, k, signal) for k in range(K)]
        threshold = None
        if warmup:
            lows = [lowest_window_mean(v, window=window, min_new_tokens=min_new) for v in values[:warmup]]
            lows = [x for x in lows if not math.isnan(x)]
            threshold = warmup_threshold(lows, keep_percent) if lows else None
        answers, weights = [], []
        for k in range(K):
            n = int(bank.lengths[p, k])
            cut = None
            if threshold is not None and k >= warmup:
                cut = cut_length(values[k], threshold, window=window, min_new_tokens=min_new)
            tokens[p] += n if cut is None else cut
            if cut is None and bank.answers[p, k] != NO_ANSWER:
                answers.append(int(bank.answers[p, k]))
                weights.append(vote_weight(float(bank.signal(p, k, "logprob").mean()) if n else math.nan))
        voted = weighted_vote(answers, weights if weighting == "confidence" else None)
        correct[p] = voted is not None and voted == int(bank.references[p])
    return ReplayOutcome(tokens=tokens, correct=correct)
