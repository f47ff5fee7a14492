"""The bundled reasoning task: multi-term addition with a written-out chain of thought.

Every number is written least-significant digit first ("LSD first"), because a
left-to-right decoder then produces each digit of a sum after the digits and the
carry it depends on. The prompt labels the terms with letters a, b, c, ...:
``a52b031c7:`` is 25 + 130 + 7.

A problem and its solution, as text::

    prompt    a52b031c7:
    solution  52000+b03100=55100;55100+c70000=26100;#26100

The solution adds the terms one at a time, each step written as
``running+<label>next=new_running;`` with every number zero-padded to WIDTH = 5
digits (on the right, since the digits are LSD first), so digit i of a sum sits at a
fixed distance from digit i of both operands, and the label in front of the copied
term points at it in the prompt (an induction-head copy rather than counting terms).
It ends with the final answer after ``#`` (still LSD first and padded: ``#26100`` is
the integer 162). The model's generation is the solution followed by EOS.

Seeds and disjointness
----------------------
``generate_problems(n, seed)`` draws from ``random.Random("haltwise-arith/<seed>")``
(a string seed is hashed with SHA-512, so the stream does not depend on
``PYTHONHASHSEED`` or the platform). Training uses seeds >= 0. The held-out
``eval_set`` uses its own seed string ``"haltwise-arith/eval"``, which no integer
seed can produce, and ``training_problems`` additionally drops every problem whose
prompt appears among the eval prompts (``is_eval_prompt``), so the training stream
can never contain an eval prompt even by chance collision.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

__all__ = [
    "VOCAB",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "ANSWER_MARK",
    "encode",
    "decode",
    "Problem",
    "generate_problems",
    "eval_set",
    "is_eval_prompt",
    "training_problems",
    "extract_answer",
    "format_training_example",
    "make_problem",
    "prompt_ids",
    "WIDTH",
    "LABELS",
    "MIN_TERMS",
    "MAX_TERMS",
    "MIN_DIGITS",
    "MAX_DIGITS",
]

# ---------------------------------------------------------------------------
# Tokenizer: one token per character, plus three special tokens.
# ---------------------------------------------------------------------------

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
ANSWER_MARK = "#"
LABELS = "abcdefghi"  # term labels, so at most 9 terms
VOCAB: list[str] = ["<pad>", "<bos>", "<eos>", *"0123456789", "+", "=", ";", ":", ANSWER_MARK, *LABELS]
_CHAR_TO_ID = {ch: i for i, ch in enumerate(VOCAB) if i > EOS_ID}


def encode(text: str) -> list[int]:
    """Character-level token ids of ``text`` (no BOS/EOS added).

    Raises ValueError naming the first character outside the vocabulary.
    """
    try:
        return [_CHAR_TO_ID[ch] for ch in text]
    except KeyError as err:
        raise ValueError(
            f"encode: text may only use the characters {''.join(VOCAB[EOS_ID + 1:])!r}, got {err.args[0]!r}"
        ) from None


def decode(ids) -> str:
    """Text of token ids: stops at the first EOS, skips PAD and BOS.

    ``ids``: any iterable of ints (a list, or a 1-D integer tensor/array).
    """
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i in (PAD_ID, BOS_ID):
            continue
        if not 0 <= i < len(VOCAB):
            raise ValueError(f"decode: token ids must be in [0, {len(VOCAB)}), got {i}")
        out.append(VOCAB[i])
    return "".join(out)


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------

MIN_TERMS, MAX_TERMS = 3, 6  # number of terms in a sum (the difficulty)
MIN_DIGITS, MAX_DIGITS = 3, 4  # digits per term, drawn per term


@dataclass(frozen=True)
class Problem:
    prompt: str  # e.g. "a52b031c7:" (labelled terms, LSD first, ends with ":")
    answer: int  # the exact sum, e.g. 162
    solution: str  # chain of thought + final answer, e.g. "52000+b03100=55100;55100+c70000=26100;#26100"
    difficulty: int  # number of terms


WIDTH = MAX_DIGITS + 1  # digits of every number in the solution: a sum of <= 9 terms of MAX_DIGITS fits


def _lsd(n: int, width: int = 0) -> str:
    """Decimal digits of n >= 0, least-significant first, zero-padded to ``width``: (162, 5) -> '26100'."""
    return str(n)[::-1].ljust(width, "0")


def make_problem(terms: list[int]) -> Problem:
    """The Problem for a list of non-negative integer terms (at least 2)."""
    if not 2 <= len(terms) <= len(LABELS) or any(t < 0 for t in terms):
        raise ValueError(f"make_problem: terms must be 2..{len(LABELS)} non-negative ints, got {terms!r}")
    prompt = "".join(label + _lsd(t) for label, t in zip(LABELS, terms)) + ":"
    width = max(WIDTH, len(str(sum(terms))))
    steps = []
    running = terms[0]
    for label, t in zip(LABELS[1:], terms[1:]):
        new = running + t
        steps.append(f"{_lsd(running, width)}+{label}{_lsd(t, width)}={_lsd(new, width)};")
        running = new
    solution = "".join(steps) + ANSWER_MARK + _lsd(running, width)
    return Problem(prompt=prompt, answer=running, solution=solution, difficulty=len(terms))


def _draw_problem(rng: random.Random, min_terms: int, max_terms: int, min_digits: int, max_digits: int) -> Problem:
    n_terms = rng.randint(min_terms, max_terms)
    terms = []
    for _ in range(n_terms):
        d = rng.randint(min_digits, max_digits)
        terms.append(rng.randint(10 ** (d - 1), 10**d - 1))  # exactly d digits
    return make_problem(terms)


def generate_problems(
    n: int,
    seed: int | str,
    *,
    min_terms: int = MIN_TERMS,
    max_terms: int = MAX_TERMS,
    min_digits: int = MIN_DIGITS,
    max_digits: int = MAX_DIGITS,
) -> list[Problem]:
    """``n`` random problems, the same list for the same arguments.

    ``seed``: an int (training streams use seeds >= 0) or a str; the generator is
    ``random.Random("haltwise-arith/<seed>")``. Terms per problem are uniform in
    [min_terms, max_terms], digits per term uniform in [min_digits, max_digits].
    """
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"generate_problems: need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"generate_problems: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(f"haltwise-arith/{seed}")
    return [_draw_problem(rng, min_terms, max_terms, min_digits, max_digits) for _ in range(n)]


EVAL_SEED = "eval"  # a string: no integer training seed maps to the same stream
EVAL_SIZE = 500


@lru_cache(maxsize=1)
def _eval_problems() -> tuple[Problem, ...]:
    # Draw from the eval stream, dropping duplicate prompts, until EVAL_SIZE are unique.
    rng = random.Random(f"haltwise-arith/{EVAL_SEED}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < EVAL_SIZE:
        p = _draw_problem(rng, MIN_TERMS, MAX_TERMS, MIN_DIGITS, MAX_DIGITS)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return tuple(out)


@lru_cache(maxsize=1)
def _eval_prompts() -> frozenset[str]:
    return frozenset(p.prompt for p in _eval_problems())


def eval_set(n: int = EVAL_SIZE) -> list[Problem]:
    """The fixed held-out evaluation set (its first ``n`` problems, n <= 500).

    Unique prompts, drawn from the seed string "haltwise-arith/eval"; never seen in
    training (see the module docstring).
    """
    if not 1 <= n <= EVAL_SIZE:
        raise ValueError(f"eval_set: n must be in [1, {EVAL_SIZE}], got {n}")
    return list(_eval_problems()[:n])


def is_eval_prompt(prompt: str) -> bool:
    """Whether ``prompt`` is the prompt of one of the 500 eval problems."""
    return prompt in _eval_prompts()


def training_problems(seed: int, **kwargs) -> Iterator[Problem]:
    """An endless stream of training problems, with every eval prompt removed.

    ``seed`` must be >= 0; chunk i of the stream is generate_problems(1024, f"{seed}/{i}").
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"training_problems: seed must be an int >= 0, got {seed!r}")
    chunk = 0
    while True:
        for p in generate_problems(1024, f"{seed}/{chunk}", **kwargs):
            if not is_eval_prompt(p.prompt):
                yield p
        chunk += 1


# ---------------------------------------------------------------------------
# Answers and training examples
# ---------------------------------------------------------------------------


def extract_answer(text: str) -> int | None:
    """The integer after the last ``#`` in ``text``, digits LSD first; None if malformed.

    ``text``: a generated solution (or prompt + solution); anything after an EOS
    should already be cut (``decode`` does that). Returns None when there is no
    ``#``, when nothing but digits follows it up to the end (surrounding
    whitespace allowed), or when the digits are empty.
    """
    pos = text.rfind(ANSWER_MARK)
    if pos < 0:
        return None
    digits = text[pos + 1 :].strip()
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits[::-1])


def format_training_example(problem: Problem) -> list[int]:
    """BOS + prompt + solution + EOS as token ids."""
    return [BOS_ID, *encode(problem.prompt), *encode(problem.solution), EOS_ID]


def prompt_ids(problem: Problem) -> list[int]:
    """BOS + prompt as token ids: what a decoder is fed before generating the solution."""
    return [BOS_ID, *encode(problem.prompt)]
