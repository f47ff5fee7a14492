"""A synthetic trace bank for building and testing the policy layer before a
real one has been recorded (``haltwise record`` / ``haltwise bench --bank-out``).

It imitates the bundled arithmetic task sampled at temperature 1: a problem
of ``d`` terms has a chain of thought of ``19 d - 12`` tokens, most of them
copies the model gets right with near certainty, and ``5 (d - 1)`` "decision"
tokens (the digits of each partial sum). Each problem has a few hard
decisions, more of them the more terms it has. A trace samples every
decision: the right token with the model's probability ``c``, otherwise the
problem's favourite wrong token there (which shifts the final answer by a
fixed offset, so wrong traces of one problem often agree and can outvote the
right ones) or another one. After a wrong token the model is unsure for a few
tokens. A few traces ramble to ``max_new_tokens`` with no answer.

So, as in the real thing: correctness is emergent, wrong traces carry a dip
in the sliding-window confidence, but hard problems also lower the
confidence of their right traces, and the absolute scale of the signals
shifts with difficulty.

Per token the generator knows a notional next-token distribution (the
sampled token, the right or favourite-wrong alternative, and a tail over the
rest of a 26-token vocabulary) and derives all five signals from it exactly as
:func:`haltwise.signals` would (logprob of the sampled token, entropy,
confidence, margin, top-20 confidence).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..scheduler import StopReason
from ..tracebank import SIGNALS, TraceBank

VOCAB = 26
TOP_K_CONF = 20


def _signals_of(probs: np.ndarray, sampled: np.ndarray) -> dict[str, np.ndarray]:
    """probs: float64 (n, VOCAB) rows summing to 1; sampled: int (n,) -> the five signals, float32 (n,)."""
    ordered = -np.sort(-probs, axis=1)
    logp = np.log(probs)
    return {
        "logprob": logp[np.arange(len(sampled)), sampled].astype(np.float32),
        "entropy": (-(probs * logp).sum(axis=1)).astype(np.float32),
        "confidence": ordered[:, 0].astype(np.float32),
        "margin": (ordered[:, 0] - ordered[:, 1]).astype(np.float32),
        "topk_conf": (-np.log(ordered[:, :TOP_K_CONF]).mean(axis=1)).astype(np.float32),
    }


def _distribution(n: int, top: np.ndarray, second: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, VOCAB): token 0 gets `top`, token 1 `second`, the rest share what is left unevenly."""
    rest = np.clip(1.0 - top - second, 1e-7, None)
    tail = rng.dirichlet(np.full(VOCAB - 2, 0.3), size=n) * rest[:, None]
    probs = np.concatenate([top[:, None], second[:, None], tail], axis=1)
    probs = np.clip(probs, 1e-9, None)
    return probs / probs.sum(axis=1, keepdims=True)


def _trace(rng: np.random.Generator, problem: dict, max_new_tokens: int) -> dict:
    n = problem["length"]
    decisions = problem["decisions"]  # positions (sorted)
    right_p = problem["right_p"]  # model probability of the right token at each decision
    fav_share = problem["fav_share"]  # share of the wrong mass on the favourite wrong token
    offsets = problem["offsets"]  # answer offset of the favourite wrong token at each decision
    ramble = rng.random() < problem["ramble_p"]
    length = max_new_tokens if ramble else n

    # the notional distribution of every token: copies are near certain
    top = 1.0 - rng.beta(1.0, 400.0, size=length)
    second = (1.0 - top) * rng.uniform(0.3, 0.9, size=length)
    sampled = np.zeros(length, dtype=np.int64)  # index into the notional distribution: 0 is the right token
    answer_shift = 0
    wrong = False
    turbulence_until = -1
    hesitation = problem["hesitation_p"]
    for i in range(length):
        if ramble and i >= n // 2:  # lost: low confidence to the end, no answer
            top[i] = rng.uniform(0.2, 0.7)
            second[i] = (1.0 - top[i]) * rng.uniform(0.3, 0.8)
        elif rng.random() < hesitation:  # an equivalent spelling the model is unsure about: answer unchanged
            top[i] = rng.uniform(0.3, 0.8)
            second[i] = (1.0 - top[i]) * rng.uniform(0.5, 0.95)
        u = rng.random()
        if u >= top[i]:  # sampled something other than the most likely token
            sampled[i] = 1 if u < top[i] + second[i] else 2 + int(rng.integers(0, VOCAB - 2))
    for j, pos in enumerate(decisions):
        if pos >= length:
            break
        p = right_p[j]
        top[pos], second[pos] = p, (1.0 - p) * fav_share[j]
        u = rng.random()
        if u < p:
            sampled[pos] = 0
        elif u < p + (1.0 - p) * fav_share[j]:
            sampled[pos] = 1
            answer_shift += offsets[j]
            wrong = True
            if rng.random() < problem["turbulence_p"]:
                turbulence_until = max(turbulence_until, pos + int(rng.integers(2, 8)))
        else:
            sampled[pos] = 2 + int(rng.integers(0, VOCAB - 2))
            answer_shift += offsets[j] * 3 + 7 * (j + 1)
            wrong = True
            if rng.random() < problem["turbulence_p"]:
                turbulence_until = max(turbulence_until, pos + int(rng.integers(2, 8)))
        for k in range(pos + 1, min(turbulence_until + 1, length)):  # re-draw the unsure tokens after it
            top[k] = rng.uniform(0.35, 0.9)
            second[k] = (1.0 - top[k]) * rng.uniform(0.4, 0.9)
            uu = rng.random()
            sampled[k] = 0 if uu < top[k] else (1 if uu < top[k] + second[k] else 2)
    probs = _distribution(length, top, second, rng)
    signals = _signals_of(probs, sampled)
    if ramble:
        answer, reason = None, StopReason.MAX_TOKENS
    else:
        answer, reason = problem["reference"] + answer_shift if wrong else problem["reference"], StopReason.EOS
    return {"answer": None if answer is None else int(answer), "reason": int(reason), **signals}


def synthetic_bank(problems: int = 200, traces: int = 32, *, seed: int = 0, max_new_tokens: int = 150,
                   difficulties: tuple[int, ...] = (3, 4, 5, 6)) -> TraceBank:
    """A TraceBank of `problems` x `traces` synthetic traces (see the module docstring).

    Difficulty is drawn uniformly from `difficulties` (terms of the sum); trace
    lengths are ``19 d - 12`` (45 to 102 tokens for 3 to 6 terms) or
    `max_new_tokens` for the rare rambling trace. Deterministic in `seed`.
    """
    if problems < 1 or traces < 1:
        raise ValueError(f"synthetic_bank: problems and traces must be >= 1, got {problems} and {traces}")
    if not difficulties or min(difficulties) < 2 or max(difficulties) > 9:
        raise ValueError(f"synthetic_bank: difficulties must be a non-empty tuple of ints in [2, 9], "
                         f"got {difficulties}")
    rng = np.random.default_rng(seed)
    references, difficulty, rows = [], [], []
    for _ in range(problems):
        d = int(rng.choice(difficulties))
        length = 19 * d - 12
        step_starts = [13 + 19 * s for s in range(d - 1)]  # the sum digits of each step (after "a+b=")
        decisions = np.array([s + i for s in step_starts for i in range(5)], dtype=np.int64)
        decisions = decisions[decisions < length]
        # most decisions are easy; a problem has a few hard ones, more with more terms
        right_p = 1.0 - rng.beta(0.6, 120.0, size=len(decisions))
        hard = rng.poisson(0.55 * (d - 1.5))
        for j in rng.choice(len(decisions), size=min(hard, len(decisions)), replace=False):
            right_p[j] = rng.uniform(0.25, 0.97)
        problem: dict[str, Any] = {
            "length": length,
            "decisions": decisions,
            "right_p": right_p,
            "fav_share": rng.uniform(0.5, 0.95, size=len(decisions)),
            "offsets": np.array([(1 + int(rng.integers(0, 9))) * 10 ** (i % 5) for i in range(len(decisions))]),
            "ramble_p": 0.01 + 0.005 * d,
            "hesitation_p": rng.uniform(0.005, 0.02 + 0.012 * d),
            "turbulence_p": rng.uniform(0.2, 0.8),
            "reference": int(rng.integers(100, 40000)),
        }
        references.append(problem["reference"])
        difficulty.append(d)
        rows.append([_trace(rng, problem, max_new_tokens) for _ in range(traces)])
    meta = {"source": "haltwise.policy.synthetic", "seed": seed, "problems": problems, "traces": traces,
            "max_new_tokens": max_new_tokens, "signals": list(SIGNALS)}
    return TraceBank.from_traces(references, difficulty, rows, meta=meta)


def describe(bank: TraceBank) -> str:
    """One line per difficulty: problems, single-trace EM, majority-vote EM, mean length."""
    from ..voting import weighted_vote
    from ..tracebank import NO_ANSWER

    lines = []
    correct = bank.correct
    for d in np.unique(bank.difficulty):
        ps = np.flatnonzero(bank.difficulty == d)
        votes = []
        for p in ps:
            answers = [int(a) for a in bank.answers[p] if a != NO_ANSWER]
            votes.append(weighted_vote(answers) == bank.references[p])
        lines.append(f"d={d}: {len(ps)} problems, trace EM {correct[ps].mean():.3f}, vote EM {np.mean(votes):.3f}, "
                     f"mean length {bank.lengths[ps].mean():.1f}")
    return "\n".join(lines) + f"\n(all: trace EM {correct.mean():.3f}; {math.fsum(bank.lengths.ravel()):.0f} tokens)"
