"""``StopTable``: per-sequence stop states fed by handle (csrc/stop_table.h), for
a caller that owns its batch -- vLLM's logits processor, whose rows come and go
and may receive zero, one or two tokens in a step. Each entry runs the rules of
a :class:`haltwise.Scheduler` row (the same native ``StopTracker``, so the same
reasons at the same tokens: tests/test_stop_table.py); one :meth:`feed` steps
any number of entries, in order."""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .scheduler import MAX_NEW_TOKENS, StopConfig, StopReason, _core, _native_rules, check_int

__all__ = ["StopTable", "NOT_FED"]

NOT_FED = -1  # feed()'s code for a token its entry did not take (the entry had stopped)


class StopTable:
    """Stop states by handle.

    ``add`` starts an entry with a StopConfig and returns its handle; ``feed``
    steps entries by handle; ``remove`` frees one (its handle may be reused).
    """

    def __init__(self) -> None:
        self._native = _core().StopTable()

    def add(self, stop: StopConfig, max_new_tokens: int = MAX_NEW_TOKENS) -> int:
        if not isinstance(stop, StopConfig):
            raise TypeError(f"StopTable.add: stop must be a StopConfig, got {type(stop).__name__}")
        max_new_tokens = check_int("StopTable.add", "max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
        return self._native.add(_native_rules(stop), max_new_tokens)

    def remove(self, handle: int) -> None:
        self._native.remove(handle)

    def num_tokens(self, handle: int) -> int:
        """Tokens the entry has taken."""
        return self._native.num_tokens(handle)

    def feed(self, handles: Any, tokens: Any, signals: Any) -> npt.NDArray[np.int8]:
        """Feed ``tokens[i]`` with row ``i`` of ``signals`` to entry ``handles[i]``, i in
        order. ``handles`` and ``tokens``: int64 ``(n,)``; ``signals``: as
        :meth:`haltwise.Scheduler.step` reads them, ``(n,)`` each. Returns int8
        ``(n,)``: the StopReason value that fired on that token, 0 for none,
        :data:`NOT_FED` for a token whose entry had already stopped. An entry
        takes no token after its reason. Handles not in the table raise
        ValueError naming the index, before anything is fed."""
        return self._native.feed(handles, tokens, signals)

    @staticmethod
    def reason(code: int) -> StopReason | None:
        """The StopReason of a code ``feed`` returned; None for 0 and NOT_FED."""
        return StopReason(code) if code > 0 else None

    def __len__(self) -> int:
        return len(self._native)

    def __repr__(self) -> str:
        return f"StopTable(entries={len(self)})"
