"""Task adapters: answer keys fit the int64 votes; the JSONL task."""
import json

import pytest

from haltwise.tasks import arith
from haltwise.tasks.adapters import ArithTask, JsonlTask, answer_key, last_integer


def test_arith_task_round_trip():
    task = ArithTask()
    problem = arith.eval_set(3)[2]
    solution = arith.encode(problem.solution) + [arith.EOS_ID]
    assert task.answer_of(solution) == task.reference(problem) == problem.answer
    assert task.prompt_ids(problem)[0] == arith.BOS_ID and task.eos_ids == (arith.EOS_ID,)


def test_oversized_answers_are_no_answer():
    assert answer_key(2**63 - 1) == 2**63 - 1 and answer_key(-(2**63)) == -(2**63)
    assert answer_key(2**63) is None and answer_key(None) is None
    huge = arith.encode("#" + "9" * 40) + [arith.EOS_ID]
    assert ArithTask().answer_of(huge) is None


def test_jsonl_task(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "answer": 4}) + "\n\n" + json.dumps({"prompt": "x", "answer": -3}))
    problems = JsonlTask.load(path)
    assert [p.answer for p in problems] == [4, -3]
    task = JsonlTask(encode=lambda s: [ord(c) for c in s], decode=lambda ids: "".join(map(chr, ids)), eos_ids=(0,))
    assert task.prompt_ids(problems[0]) == [50, 43, 50, 61]
    assert task.answer_of([ord(c) for c in "so 1,234 then 56"]) == 56
    assert last_integer("no digits") is None and last_integer("1,234") == 1234
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": "4"}))
    with pytest.raises(ValueError, match="bad.jsonl:1: each line needs"):
        JsonlTask.load(bad)
