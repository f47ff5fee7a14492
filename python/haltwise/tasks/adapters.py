"""Task adapters for parallel sampling (haltwise.decoding.parallel.Task): the
bundled arithmetic task, and a JSONL file of the user's problems."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import numpy.typing as npt

from . import arith

# Generated token ids: a list, or the int64 array of a Finished record.
TokenIds = Union[Sequence[int], npt.NDArray[np.int64]]


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def answer_key(value: int | None) -> int | None:
    """An extracted answer as a vote key: votes and the scheduler hold int64,
    so a (malformed) answer outside that range counts as no answer."""
    return value if value is not None and _INT64_MIN <= value <= _INT64_MAX else None


class ArithTask:
    """The bundled task: prompt ids, answer extraction, reference answer."""

    eos_ids = (arith.EOS_ID,)

    def prompt_ids(self, problem: arith.Problem) -> list[int]:
        return arith.prompt_ids(problem)

    def answer_of(self, token_ids: TokenIds) -> int | None:
        return answer_key(arith.extract_answer(arith.decode(token_ids)))

    def reference(self, problem: arith.Problem) -> int:
        return problem.answer

    def difficulty(self, problem: arith.Problem) -> int:
        return problem.difficulty


@dataclass(frozen=True)
class JsonlProblem:
    prompt: str
    answer: int


_LAST_INT = re.compile(r"-?\d+")


def last_integer(text: str) -> int | None:
    """The answer key of free text: its last integer, or None."""
    found = _LAST_INT.findall(text.replace(",", ""))
    return int(found[-1]) if found else None


class JsonlTask:
    """Problems from a JSONL file, one object per line with "prompt" (str) and
    "answer" (int), tokenized by the model's own tokenizer (encode: str ->
    ids; decode: ids -> str). The answer of a trace is the last integer of its
    text."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[TokenIds], str],
                 eos_ids: Sequence[int]):
        self.encode, self.decode = encode, decode
        self.eos_ids = tuple(eos_ids)

    @staticmethod
    def load(path: str | Path) -> list[JsonlProblem]:
        """The problems of a JSONL file; ValueError naming the file and the
        line (1-based) of the first bad one, FileNotFoundError if missing."""
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); expected one JSON "
                             f"object per line") from None
        problems = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                kind = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
                        type(None): "null"}.get(type(row), type(row).__name__)
                raise ValueError(f'{path}:{n}: each line must be a JSON object {{"prompt": str, "answer": int}}, '
                                 f"got {kind}")
            if not isinstance(row.get("prompt"), str) or isinstance(row.get("answer"), bool) \
                    or not isinstance(row.get("answer"), int):
                raise ValueError(f"{path}:{n}: each line needs a string 'prompt' and an int 'answer', got {row!r}")
            problems.append(JsonlProblem(prompt=row["prompt"], answer=row["answer"]))
        if not problems:
            raise ValueError(f"{path}: no problems")
        return problems

    def prompt_ids(self, problem: JsonlProblem) -> list[int]:
        return self.encode(problem.prompt)

    def answer_of(self, token_ids: TokenIds) -> int | None:
        return answer_key(last_integer(self.decode(token_ids)))

    def reference(self, problem: JsonlProblem) -> int:
        return problem.answer

    def difficulty(self, problem: JsonlProblem) -> int:
        return len(problem.prompt)
