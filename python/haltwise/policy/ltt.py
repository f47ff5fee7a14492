"""The accuracy test behind every threshold the policy certifies: exact
p-values for "the EM drop of candidate c is more than epsilon", and
Learn-then-Test fixed-sequence testing over candidates ordered from safest to
most aggressive.

The data of one candidate are paired differences over labelled control
problems, ``D_i = correct_uncut_i - correct_candidate_i`` in {-1, 0, 1}
(1: the cut lost a right answer -- a *harm*; -1: the cut fixed a wrong one --
a *help*). The null hypothesis of candidate c is ``H_c: E[D] > epsilon`` (its
EM is more than epsilon below the uncut EM); rejecting it certifies c.

Two exact tests, both valid for every distribution of D with E[D] > epsilon
(no normal approximation, any sample size):

``binomial``
    Uses only the harms: ``p = P(Binomial(n, epsilon) <= harms)``. Valid
    because P(harm) >= E[D] > epsilon under H_c. Ignores helps, so it is
    conservative when cutting fixes answers; it is the test to use when
    labels say only right/wrong (helps cannot be seen then).
``mcnemar``
    A paired (McNemar-style) non-inferiority test that counts helps too.
    Let U be the one-sided Clopper-Pearson upper bound on P(harm) at level
    delta/2 (so P(harm) <= U with probability >= 1 - delta/2). Route 1: if
    U <= epsilon, reject (that is the binomial test at delta/2). Route 2:
    given the m = harms + helps discordant problems, harms ~ Binomial(m, pi)
    with pi = P(harm) / (P(harm) + P(help)); under H_c, P(help) < P(harm) -
    epsilon, so pi > p / (2 p - epsilon) with p = P(harm), and that bound
    falls as p grows, so whenever P(harm) <= U, pi > pi0 := U / (2 U -
    epsilon). Reject when ``P(Binomial(m, pi0) <= harms) <= delta/2``. On the
    event P(harm) <= U the true conditional cdf is below that one, so the
    route errs with probability <= delta/2 given m; a union bound with the
    event P(harm) > U gives level delta. More helps (harms fixed) only make
    rejection easier.

Fixed-sequence testing (Bauer 1991; Learn then Test, Angelopoulos et al.
2021): test the candidates in a fixed order, safest first, each at the full
level delta, and stop at the first one not rejected. The family-wise error
is at most delta, so with probability >= 1 - delta every certified candidate
has an EM drop of at most epsilon. With a fine grid one unlucky early
candidate would block all later ones, so :func:`certified_set` runs
``starts`` such chains from start points fixed in advance (grid positions
0, G/starts, 2G/starts, ...), each at delta / starts, and certifies the
union (Bonferroni over the chains: family-wise error still <= delta; the
multiple-start fixed-sequence procedure of the LTT paper).
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import numpy.typing as npt

Counts = Union[Sequence[int], npt.NDArray[np.integer]]  # per-candidate counts

TESTS = ("binomial", "mcnemar")

# The caches of rejects() and clopper_pearson_upper(). Their keys hold the test level, and the re-test schedule
# (anytime.py) spends a new, smaller level at every checkpoint, so the entries of earlier checkpoints are never
# asked again. A serving Policy lives for millions of requests: a large bound is reached only after ~1M requests
# and is then ~60 MiB of dead entries (the soak's RSS grew ~20-40 bytes per request). Its working set (the levels
# in force) is a few thousand keys, so SERVING_CACHE loses no hits there; batch_cache() enlarges the caches for
# short-lived runs that revisit every level (haltwise policy simulate).
SERVING_CACHE = 4096
BATCH_CACHE = 1 << 18


@contextmanager
def batch_cache(maxsize: int = BATCH_CACHE) -> Iterator[None]:
    """Within the block, rejects() and clopper_pearson_upper() use fresh caches
    of up to `maxsize` entries (dropped when the block ends): for a batch run
    that revisits the same levels many times, such as the simulator. Not for
    a long-lived process; not thread-safe (it rebinds the module's functions)."""
    global rejects, clopper_pearson_upper
    saved = rejects, clopper_pearson_upper
    rejects = functools.lru_cache(maxsize=maxsize)(saved[0].__wrapped__)
    clopper_pearson_upper = functools.lru_cache(maxsize=maxsize)(saved[1].__wrapped__)
    try:
        yield
    finally:
        rejects, clopper_pearson_upper = saved


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), exact up to float rounding (log-space sum)."""
    if n < 0:
        raise ValueError(f"binomial_cdf: n must be >= 0, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_cdf: p must be in [0, 1], got {p}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    if k == 0:
        return math.exp(n * math.log1p(-p))
    if k <= 40:  # a plain loop beats numpy's call overhead for short sums
        log_ratio = math.log(p) - math.log1p(-p)
        term = n * math.log1p(-p)
        logs = [term]
        for i in range(1, k + 1):
            term += math.log((n - i + 1.0) / i) + log_ratio
            logs.append(term)
        top = max(logs)
        return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))
    i = np.arange(1, k + 1, dtype=np.float64)
    # log pmf(i) = log pmf(0) + sum_{r<=i} log((n - r + 1) / r) + i log(p / (1 - p))
    steps = np.log((n - i + 1.0) / i) + (math.log(p) - math.log1p(-p))
    logpmf = np.concatenate([[n * math.log1p(-p)], n * math.log1p(-p) + np.cumsum(steps)])
    top = logpmf.max()
    return float(min(1.0, math.exp(top) * np.exp(logpmf - top).sum()))


@functools.lru_cache(maxsize=SERVING_CACHE)
def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound on p from k successes in n
    trials: the p at which P(Binomial(n, p) <= k) = alpha (1.0 when k == n)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"clopper_pearson_upper: need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"clopper_pearson_upper: alpha must be in (0, 1), got {alpha}")
    if k == n:
        return 1.0
    lo, hi = k / n, 1.0
    # bracket with the Wilson bound (z from a Chernoff-style bound on the normal tail), then bisect
    z = math.sqrt(2.0 * math.log(1.0 / alpha))
    phat = k / n
    wilson = (phat + z * z / (2 * n) + z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    guess = min(1.0, max(lo, wilson))
    if binomial_cdf(k, n, guess) <= alpha:
        hi = guess
    else:
        lo = guess
    while hi - lo > 1e-10 * max(hi, 1e-3):  # the cdf falls as p grows
        mid = 0.5 * (lo + hi)
        if binomial_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def binomial_p_value(harms: int, n: int, epsilon: float) -> float:
    """p-value of H: P(harm) > epsilon after `harms` harms in n problems."""
    if n == 0:
        return 1.0
    return binomial_cdf(harms, n, epsilon)


def mcnemar_rejects(harms: int, helps: int, n: int, epsilon: float, delta: float) -> bool:
    """Whether the paired non-inferiority test (module docstring) rejects
    H: E[D] > epsilon at level delta.

    Computed without the harm bound U itself: route 2 rejects iff pi0(U) >=
    pi* where pi* is the Clopper-Pearson upper bound of harms / m at level
    delta/2 (it depends on small integers only, so it is cached), that is iff
    U <= U* = pi* epsilon / (2 pi* - 1), that is iff
    P(Binomial(n, U*) <= harms) <= delta/2."""
    if n == 0:
        return False
    half = delta / 2.0
    if binomial_cdf(harms, n, epsilon) <= half:  # route 1: U <= epsilon
        return True
    m = harms + helps
    if m == 0 or harms == m:
        return False  # pi0 < 1 = pi* when every discordant problem is a harm
    pi_star = clopper_pearson_upper(harms, m, half)
    if pi_star <= 0.5:
        return True  # pi0 > 1/2 >= pi*
    u_star = pi_star * epsilon / (2.0 * pi_star - 1.0)
    if u_star >= 1.0:
        return True
    return binomial_cdf(harms, n, u_star) <= half


def _mcnemar_rejects_direct(harms: int, helps: int, n: int, epsilon: float, delta: float) -> bool:
    """The same decision computed literally (U by bisection, then the
    conditional binomial test); kept for the tests."""
    if n == 0:
        return False
    upper = clopper_pearson_upper(harms, n, delta / 2.0)
    if upper <= epsilon:
        return True
    m = harms + helps
    if m == 0:
        return False
    pi0 = upper / (2.0 * upper - epsilon)
    return binomial_cdf(harms, m, pi0) <= delta / 2.0


def mcnemar_p_value(harms: int, helps: int, n: int, epsilon: float) -> float:
    """The smallest level at which :func:`mcnemar_rejects` rejects (rejection
    is monotone in the level), found by bisection; for reports."""
    if not mcnemar_rejects(harms, helps, n, epsilon, 0.999999):
        return 1.0
    lo, hi = 0.0, 0.999999
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if mcnemar_rejects(harms, helps, n, epsilon, mid):
            hi = mid
        else:
            lo = mid
    return hi


@functools.lru_cache(maxsize=SERVING_CACHE)
def rejects(test: str, harms: int, helps: int, n: int, epsilon: float, delta: float) -> bool:
    """Level-delta decision of `test` ("binomial" or "mcnemar") on one candidate."""
    if test == "binomial":
        return n > 0 and binomial_cdf(harms, n, epsilon) <= delta
    if test == "mcnemar":
        return mcnemar_rejects(harms, helps, n, epsilon, delta)
    raise ValueError(f"rejects: test must be one of {TESTS}, got {test!r}")


def p_value(test: str, harms: int, helps: int, n: int, epsilon: float) -> float:
    if test == "binomial":
        return binomial_p_value(harms, n, epsilon)
    if test == "mcnemar":
        return mcnemar_p_value(harms, helps, n, epsilon)
    raise ValueError(f"p_value: test must be one of {TESTS}, got {test!r}")


def fixed_sequence(decisions: Iterable[Callable[[], bool]]) -> int:
    """Fixed-sequence testing: call the level-delta decisions in order (safest
    first) and stop at the first that does not reject. Returns the index of
    the last rejected one, -1 when even the first is not rejected."""
    last = -1
    for i, decide in enumerate(decisions):
        if not decide():
            break
        last = i
    return last


def certify(differences: np.ndarray, *, epsilon: float, delta: float, test: str) -> int:
    """Learn-then-Test over candidates: `differences` is ``(n, C)`` with values
    in {-1, 0, 1} (column c: the paired differences of candidate c, columns
    ordered from safest to most aggressive). Returns the index of the most
    aggressive certified candidate, -1 if none."""
    d = np.asarray(differences)
    if d.ndim != 2:
        raise ValueError(f"certify: differences must be 2-D (problems, candidates), got shape {d.shape}")
    if d.size and not np.isin(d, (-1, 0, 1)).all():
        raise ValueError("certify: differences must hold only -1, 0 and 1")
    n = d.shape[0]
    harms = (d == 1).sum(axis=0)
    helps = (d == -1).sum(axis=0)
    return certify_counts(harms, helps, n, epsilon=epsilon, delta=delta, test=test)


def chain_counts(differences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(harms, helps) per candidate column of an (n, C) difference matrix."""
    d = np.asarray(differences)
    return (d == 1).sum(axis=0), (d == -1).sum(axis=0)


def certify_counts(harms: Counts, helps: Counts, n: int, *, epsilon: float, delta: float,
                   test: str) -> int:
    """:func:`certify` from per-candidate counts."""
    def decision(c: int) -> bool:
        return rejects(test, int(harms[c]), int(helps[c]), n, epsilon, delta)

    return fixed_sequence(functools.partial(decision, c) for c in range(len(harms)))


def chain_starts(size: int, starts: int) -> list[int]:
    """Start points of the chains over `size` ordered candidates (distinct, increasing, first 0)."""
    if size <= 0:
        return []
    return sorted({(i * size) // starts for i in range(starts)})


def certified_set(harms: Counts, helps: Counts, n: int, *, epsilon: float, delta: float, test: str,
                  starts: int = 1) -> list[int]:
    """Candidates certified by fixed-sequence chains from :func:`chain_starts`
    (each at delta / number of chains), increasing. Family-wise error <= delta."""
    points = chain_starts(len(harms), starts)
    if not points:
        return []
    level = delta / len(points)
    out: set[int] = set()
    for start in points:
        if start in out:
            continue  # an earlier chain already went through here; this chain cannot add anything new below
        for c in range(start, len(harms)):
            if c in out:
                continue
            if not rejects(test, int(harms[c]), int(helps[c]), n, epsilon, level):
                break
            out.add(c)
    return sorted(out)


def min_evidence(epsilon: float, delta: float, test: str) -> int:
    """Fewest labelled problems with which `test` can certify anything (a
    candidate with no harm and no help)."""
    if test == "binomial":
        return math.ceil(math.log(delta) / math.log1p(-epsilon))
    n = 1
    while not mcnemar_rejects(0, 0, n, epsilon, delta):
        n *= 2
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if mcnemar_rejects(0, 0, mid, epsilon, delta):
            hi = mid
        else:
            lo = mid
    return hi
