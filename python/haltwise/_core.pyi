"""
haltwise native core: the fused CPU signal kernel and the batch scheduler
"""
from __future__ import annotations
import collections.abc
import numpy
import typing
import numpy as np
import numpy.typing as npt
from haltwise.scheduler import StopReason
__all__: list[str] = ['Finished', 'MAX_NEW_TOKENS', 'MAX_TOP_K_CONF', 'MAX_WINDOW', 'STATUS_NAN', 'STATUS_NO_FINITE', 'STATUS_POSINF', 'Scheduler', 'StepPlan', 'StopRules', 'StopTable', 'philox4x32_10', 'scheduler_register_types', 'signals_cpu', 'signals_cpu_isa']
class Finished:
    """
    A sequence that ended (haltwise.Finished documents the fields).
    """
    @staticmethod
    def __new__(type, *args, **kwargs):
        """
        Create and return a new object.  See help(type) for accurate signature.
        """
    def __repr__(self):
        """
        Return repr(self).
        """
    @property
    def request_id(self) -> int:
        ...
    @property
    def reason(self) -> StopReason:
        ...
    @property
    def group(self) -> int | None:
        ...
    @property
    def num_tokens(self) -> int:
        ...
    @property
    def tokens(self) -> npt.NDArray[np.int64]:
        ...
    @property
    def mean_topk_conf(self) -> float:
        ...
    @property
    def mean_logprob(self) -> float:
        ...
    @property
    def mean_neg_entropy(self) -> float:
        ...
    @property
    def mean_signal(self) -> float:
        ...
    @property
    def min_window_mean(self) -> float:
        ...
    @property
    def last_window_mean(self) -> float:
        ...
    @property
    def last_entropy(self) -> float:
        ...
    @property
    def steps_below_threshold(self) -> int:
        ...
    @property
    def would_stop_step(self) -> int:
        ...
    @property
    def would_stop_reason(self) -> StopReason | None:
        ...
    @property
    def signals(self) -> dict[str, npt.NDArray[np.float32]] | None:
        ...
class StepPlan:
    """
    What the caller does before the next step (haltwise.StepPlan documents the fields).
    """
    @staticmethod
    def __new__(type, *args, **kwargs):
        """
        Create and return a new object.  See help(type) for accurate signature.
        """
    def __repr__(self):
        """
        Return repr(self).
        """
    @property
    def finished(self) -> list[Finished]:
        ...
    @property
    def keep(self) -> npt.NDArray[np.int64]:
        ...
    @property
    def admitted(self) -> list[tuple[int, int]]:
        ...
    @property
    def request_ids(self) -> npt.NDArray[np.int64]:
        ...
    @property
    def positions(self) -> npt.NDArray[np.int64]:
        ...
    @property
    def active(self) -> npt.NDArray[np.bool_] | None:
        ...
    @property
    def free_slots(self) -> npt.NDArray[np.int64] | None:
        ...
class StopRules:
    """
    A validated StopConfig with its stop-sequence automaton built. Use haltwise.StopConfig.
    """
    def __init__(self, *, eos_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], stop_sequences: collections.abc.Sequence[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]], min_new_tokens: typing.SupportsInt | typing.SupportsIndex, low_conf_signal: str, low_conf_threshold: typing.SupportsFloat | typing.SupportsIndex | None, window: typing.SupportsInt | typing.SupportsIndex, confident_entropy_below: typing.SupportsFloat | typing.SupportsIndex | None, confident_margin_above: typing.SupportsFloat | typing.SupportsIndex | None, confident_steps: typing.SupportsInt | typing.SupportsIndex, shadow: bool, record_signals: bool) -> None:
        ...
class Scheduler:
    """
    The native batch scheduler. Use haltwise.Scheduler.
    """
    def __init__(self, *, capacity: typing.SupportsInt | typing.SupportsIndex, layout: str, max_queue: typing.SupportsInt | typing.SupportsIndex, aging_steps: typing.SupportsInt | typing.SupportsIndex, wave_size: typing.SupportsInt | typing.SupportsIndex, group_atomic: bool, consensus_fraction: typing.SupportsFloat | typing.SupportsIndex | None, consensus_min_votes: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def cancel(self, request_id: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def fail_next_admissions(self, count: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Testing hook: the next `count` admissions fail as if memory ran out.
        """
    def leader(self, group: typing.SupportsInt | typing.SupportsIndex) -> int | None:
        ...
    def report_answer(self, request_id: typing.SupportsInt | typing.SupportsIndex, answer_key: typing.SupportsInt | typing.SupportsIndex, weight: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    def settle_group(self, group: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def stats(self) -> dict:
        ...
    def step(self, tokens: typing.Any, signals: typing.Any) -> typing.Any:
        ...
    def submit(self, request_id: typing.SupportsInt | typing.SupportsIndex, max_new_tokens: typing.SupportsInt | typing.SupportsIndex, priority: typing.SupportsInt | typing.SupportsIndex, group: typing.SupportsInt | typing.SupportsIndex | None, rules: StopRules, max_weight: typing.SupportsFloat | typing.SupportsIndex | None = None) -> None:
        ...
    def vote(self, group: typing.SupportsInt | typing.SupportsIndex) -> dict:
        ...
    @property
    def batch_size(self) -> int:
        ...
    @property
    def capacity(self) -> int:
        ...
    @property
    def layout(self) -> str:
        ...
class StopTable:
    """
    Stop states fed by handle, for a caller that owns its batch (haltwise.integrations.vllm_rows). feed() returns one reason code per token: a StopReason value, 0 for none, -1 for a token not fed (its entry had stopped).
    """
    def __init__(self) -> None:
        ...
    def __len__(self) -> int:
        ...
    def add(self, rules: StopRules, max_new_tokens: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def feed(self, handles: typing.Any, tokens: typing.Any, signals: typing.Any) -> numpy.ndarray:
        ...
    def num_tokens(self, handle: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def remove(self, handle: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
def philox4x32_10(counter: typing.Annotated[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], "FixedSize(4)"], key: typing.Annotated[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], "FixedSize(2)"]) -> typing.Annotated[list[int], "FixedSize(4)"]:
    """
    Philox 4x32-10 of one counter (4 words) under a key (2 words).
    """
def scheduler_register_types(stop_reason: typing.Any, queue_full: typing.Any) -> None:
    """
    Tells the native scheduler the Python StopReason enum and QueueFull exception (haltwise.scheduler).
    """
def signals_cpu(*, logits: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, batch: typing.SupportsInt | typing.SupportsIndex, vocab: typing.SupportsInt | typing.SupportsIndex, row_stride: typing.SupportsInt | typing.SupportsIndex, sample: bool, inv_temperature: typing.SupportsFloat | typing.SupportsIndex, top_k_conf: typing.SupportsInt | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex, offset: typing.SupportsInt | typing.SupportsIndex, salt_with_row: bool, token: typing.SupportsInt | typing.SupportsIndex, logprob: typing.SupportsInt | typing.SupportsIndex, entropy: typing.SupportsInt | typing.SupportsIndex, confidence: typing.SupportsInt | typing.SupportsIndex, margin: typing.SupportsInt | typing.SupportsIndex, topk_conf: typing.SupportsInt | typing.SupportsIndex, status: typing.SupportsInt | typing.SupportsIndex, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
    """
    Fused stop signals over raw buffers (addresses as ints). Use haltwise.signals instead.
    """
def signals_cpu_isa() -> str:
    """
    Instruction set the CPU kernel dispatches to here.
    """
MAX_NEW_TOKENS: int = 16777216
MAX_TOP_K_CONF: int = 128
MAX_WINDOW: int = 65536
STATUS_NAN: int = 1
STATUS_NO_FINITE: int = 4
STATUS_POSINF: int = 2
