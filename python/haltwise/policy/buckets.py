"""Context buckets: the caller's key of a request, the tree of buckets it
names, each bucket's state, and the fallback rule that says whose values a
request runs with.

A key is a path: ``("arith", "terms=5")`` (or the string ``"arith/terms=5"``)
names the bucket ``arith/terms=5``, a child of ``arith``, a child of the
global bucket ``""`` (the root). Every bucket on a request's path exists (it
is created on first sight) and takes evidence from the request.

Fallback rule -- the values a request runs with come from
  1. the deepest bucket on its path that is *ready* (it holds at least
     ``min_evidence`` labelled control requests since its grid froze, so its
     own test decides: "certified");
  2. otherwise the deepest bucket on its path whose warm-up is done: its
     DeepConf start threshold, not yet certified ("deepconf"; or no cut with
     ``start="uncut"``);
  3. otherwise nothing: the request runs uncut.
A bucket whose warm-up is not complete takes the request as one of its
warm-up requests if it still needs one (the request then runs uncut with its
signals kept, whatever rules 1-3 say).

Under overload, a request whose values are certified (rule 1) runs with the
overload values of the deepest ready bucket on its path whose overload test
has certified a candidate (its own, else its nearest such ancestor); if there
is none, with its normal values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

SEPARATOR = "/"
ROOT = ""


def normalize_key(key) -> tuple[str, ...]:
    """A request key as a tuple of non-empty strings: None or "" -> () (the
    root), "a/b" -> ("a", "b"), a sequence of str -> itself."""
    if key is None:
        return ()
    if isinstance(key, str):
        parts = tuple(key.split(SEPARATOR)) if key else ()
    elif not hasattr(key, "__iter__") or isinstance(key, bytes):
        raise TypeError(f"plan: key must be None, a str or a sequence of str, got {type(key).__name__}")
    else:
        parts = tuple(key)
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"plan: key parts must be str, got {type(part).__name__} in {parts!r}")
    for part in parts:
        if not part or SEPARATOR in part:
            raise ValueError(f"plan: key parts must be non-empty and free of {SEPARATOR!r}, got {parts!r}")
    return parts


def bucket_name(parts: Sequence[str]) -> str:
    return SEPARATOR.join(parts)


CLASS_PREFIX = "@"  # a key's first part "@name" is request class `name`: a tree of its own


def class_of(name: str) -> str | None:
    """The request class a bucket belongs to (None: the unclassed tree)."""
    return name.split(SEPARATOR, 1)[0][len(CLASS_PREFIX):] if name.startswith(CLASS_PREFIX) else None


def path_of(parts: Sequence[str]) -> list[str]:
    """Bucket names from the root to the request's own bucket. A request
    class's tree starts at its class bucket: it never takes evidence from,
    nor falls back to, the global bucket (its budget is its own)."""
    names = [bucket_name(parts[:i]) for i in range(len(parts) + 1)]
    return names[1:] if parts and parts[0].startswith(CLASS_PREFIX) else names


def display_name(name: str) -> str:
    return name if name else "(global)"


@dataclass
class Ramp:
    """A value in force that moves toward a target: down at once, up by at
    most ``max_raise_steps`` grid steps per ``raise_interval`` requests."""

    index: int = -1  # grid index in force (-1: no cut)
    target: int = -1
    strategy: int = 0  # strategy row in force (config.strategy_rows; normal ramps only; 0: K traces at once)
    target_strategy: int = 0
    target_certified: list[int] = field(default_factory=list)  # grid indices the target row certified
    plain_certified: list[int] = field(default_factory=list)  # grid indices row 0 certified (callers without waves)
    traces: int = 0  # traces in force (overload ramps only; 0: unset)
    target_traces: int = 0
    last_raise_seq: int = -(10**18)
    certified: list[int] = field(default_factory=list)  # grid indices the last test certified (-1: no cut)


@dataclass
class SliceCounts:
    """Served requests since the last change of the bucket's threshold, split
    by whether they ran with a cut ("cut") or uncut ("uncut"): counts, user
    bad-report weight, labelled requests and how many of those were right."""

    since_seq: int = 0
    cut_n: int = 0
    cut_bad: float = 0.0
    cut_labeled: int = 0
    cut_right: int = 0
    uncut_n: int = 0
    uncut_bad: float = 0.0
    uncut_labeled: int = 0
    uncut_right: int = 0


@dataclass
class ShadowCounts:
    """What shadow mode would have done, summed over shadow requests."""

    requests: int = 0
    tokens_uncut: int = 0
    tokens_would: int = 0
    flips: int = 0  # requests whose answer the cut would have changed
    labeled: int = 0
    harms: int = 0  # labelled: the served (uncut) answer was right, the would-be one not
    helps: int = 0  # labelled with a reference: the would-be answer was right, the served one not


@dataclass
class BucketState:
    """Everything the policy keeps about one bucket (persisted as JSON)."""

    name: str
    warmup_planned: list[int] = field(default_factory=list)  # warm-up request ids, outstanding or observed
    warmup_observed: list[int] = field(default_factory=list)
    warmup_lowests: list[float] = field(default_factory=list)
    grid: list[float] | None = None  # candidate thresholds, ascending (frozen after warm-up)
    frozen_seq: int | None = None
    deepconf_index: int = -1
    normal: Ramp = field(default_factory=Ramp)
    overload: Ramp = field(default_factory=Ramp)
    overload_ready: bool = False
    cooldown_until: int = -1
    shadow: bool = False
    pending_evidence: int = 0
    ready: bool = False
    labeled: int = 0  # labelled control requests in the window at the last evaluation
    control: int = 0  # control requests in the window at the last evaluation
    slices: SliceCounts = field(default_factory=SliceCounts)
    shadow_counts: ShadowCounts = field(default_factory=ShadowCounts)
    last_eval: dict = field(default_factory=dict)
    anytime: dict = field(default_factory=dict)  # anytime.AnytimeState of the re-test schedule

    @property
    def frozen(self) -> bool:
        return self.grid is not None

    def threshold_of(self, index: int) -> float | None:
        if index < 0 or self.grid is None:
            return None
        return float(self.grid[index])

    def to_dict(self) -> dict:
        """A JSON-ready copy (hand-written: asdict's deep copies were the policy's hottest path)."""
        out = {f: getattr(self, f) for f in _PLAIN}
        out["warmup_planned"] = list(self.warmup_planned)
        out["warmup_observed"] = list(self.warmup_observed)
        out["warmup_lowests"] = list(self.warmup_lowests)
        out["last_eval"] = dict(self.last_eval)
        out["anytime"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.anytime.items()}
        for name in ("normal", "overload", "slices", "shadow_counts"):
            out[name] = dict(vars(getattr(self, name)))
        out["normal"]["certified"] = list(self.normal.certified)
        out["overload"]["certified"] = list(self.overload.certified)
        out["normal"]["target_certified"] = list(self.normal.target_certified)
        out["normal"]["plain_certified"] = list(self.normal.plain_certified)
        out["overload"]["plain_certified"] = list(self.overload.plain_certified)
        out["overload"]["target_certified"] = list(self.overload.target_certified)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "BucketState":
        data = dict(data)
        data.setdefault("grid", None)
        data["normal"] = Ramp(**data["normal"])
        data["overload"] = Ramp(**data["overload"])
        data["slices"] = SliceCounts(**data["slices"])
        data["shadow_counts"] = ShadowCounts(**data["shadow_counts"])
        return cls(**data)


_PLAIN = ("name", "frozen_seq", "deepconf_index", "overload_ready", "cooldown_until", "shadow", "pending_evidence",
          "ready", "labeled", "control")


def resolve(path: Sequence[BucketState]) -> tuple[BucketState | None, str]:
    """The fallback rule (module docstring): (bucket whose values apply, how),
    how in {"certified", "deepconf", "uncut"}. `path` runs root first."""
    for bucket in reversed(path):
        if bucket.ready:
            return bucket, "certified"
    for bucket in reversed(path):
        if bucket.frozen:
            return bucket, "deepconf"
    return None, "uncut"


def needs_warmup(bucket: BucketState, warmup_requests: int) -> bool:
    return not bucket.frozen and len(bucket.warmup_planned) < warmup_requests
