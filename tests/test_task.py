"""The bundled arithmetic task: generator, tokenizer, answer extraction, eval/train split."""

import itertools

import pytest

from haltwise.tasks import arith


def test_generate_problems_is_deterministic_per_seed():
    a = arith.generate_problems(50, 7)
    b = arith.generate_problems(50, 7)
    c = arith.generate_problems(50, 8)
    assert a == b
    assert a != c


def test_problem_fields_agree():
    for p in arith.generate_problems(200, 0):
        body = p.prompt.rstrip(":")
        for label in arith.LABELS:
            body = body.replace(label, " ")
        terms = [int(t[::-1]) for t in body.split()]
        assert sum(terms) == p.answer
        assert p.difficulty == len(terms)
        assert arith.MIN_TERMS <= p.difficulty <= arith.MAX_TERMS
        # one step "running+term=new;" per term after the first
        assert p.solution.count(";") == p.difficulty - 1
        # every number of the solution is zero-padded to WIDTH digits, so digits line up
        steps, final = p.solution.split("#")
        for step in steps.rstrip(";").split(";"):
            run, rest = step.split("+")
            term, new = rest[1:].split("=")
            assert len(run) == len(term) == len(new) == arith.WIDTH
            assert int(run[::-1]) + int(term[::-1]) == int(new[::-1])
        assert len(final) == arith.WIDTH


def test_make_problem_example():
    p = arith.make_problem([25, 130, 7])
    assert p.prompt == "a52b031c7:"
    assert p.solution == "52000+b03100=55100;55100+c70000=26100;#26100"
    assert p.answer == 162 and p.difficulty == 3


def test_difficulty_range_is_respected():
    ps = arith.generate_problems(300, 1, min_terms=4, max_terms=5)
    assert {p.difficulty for p in ps} == {4, 5}


def test_eval_set_is_fixed_unique_and_sized():
    ev = arith.eval_set()
    assert len(ev) == arith.EVAL_SIZE == 500
    assert len({p.prompt for p in ev}) == 500
    assert arith.eval_set(20) == ev[:20]
    # difficulties are mixed
    assert {p.difficulty for p in ev} == set(range(arith.MIN_TERMS, arith.MAX_TERMS + 1))


def test_eval_solutions_extract_to_the_answer():
    for p in arith.eval_set():
        assert arith.extract_answer(p.solution) == p.answer
        assert arith.extract_answer(p.prompt + p.solution) == p.answer
        # and through the tokenizer, as a model's output would be read
        assert arith.extract_answer(arith.decode(arith.encode(p.solution) + [arith.EOS_ID])) == p.answer


def test_training_stream_never_contains_eval_prompts():
    eval_prompts = {p.prompt for p in arith.eval_set()}
    stream = arith.training_problems(0)
    train = [next(stream) for _ in range(5000)]
    assert not eval_prompts & {p.prompt for p in train}
    # the filter itself works: an eval prompt is recognised
    assert arith.is_eval_prompt(arith.eval_set(1)[0].prompt)
    assert not arith.is_eval_prompt(train[0].prompt)


def test_training_stream_drops_eval_prompts_even_on_collision(monkeypatch):
    # Pretend the first training problem of seed 0 were an eval prompt: the stream must skip it.
    first = next(arith.training_problems(0))
    monkeypatch.setattr(arith, "is_eval_prompt", lambda prompt: prompt == first.prompt)
    assert all(p.prompt != first.prompt for p in itertools.islice(arith.training_problems(0), 2000))


def test_training_stream_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed"):
        next(arith.training_problems(-1))


def test_tokenizer_round_trip():
    for p in arith.generate_problems(100, 3):
        text = p.prompt + p.solution
        ids = arith.encode(text)
        assert all(0 <= i < len(arith.VOCAB) for i in ids)
        assert arith.decode(ids) == text
    assert len(set(arith.VOCAB)) == len(arith.VOCAB)


def test_decode_stops_at_eos_and_skips_pad_and_bos():
    ids = [arith.BOS_ID, *arith.encode("a12b3"), arith.PAD_ID, *arith.encode("4"), arith.EOS_ID, *arith.encode("99")]
    assert arith.decode(ids) == "a12b34"


def test_encode_rejects_unknown_characters():
    with pytest.raises(ValueError, match="encode"):
        arith.encode("12x3")
    with pytest.raises(ValueError, match="encode"):
        arith.encode("12 3")


def test_format_training_example():
    p = arith.generate_problems(1, 0)[0]
    ids = arith.format_training_example(p)
    assert ids[0] == arith.BOS_ID and ids[-1] == arith.EOS_ID
    assert arith.decode(ids) == p.prompt + p.solution
    assert arith.prompt_ids(p) == ids[: len(p.prompt) + 1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("52000+b03100=55100;55100+c70000=26100;#26100", 162),
        ("52+031=551;551+7=261;#261", 162),
        ("#0", 0),
        ("#07", 70),  # LSD first: "07" is seventy
        ("#261 ", 162),  # surrounding whitespace is tolerated
        ("12#5;#87", 78),  # the last mark wins
    ],
)
def test_extract_answer_good(text, expected):
    assert arith.extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",  # nothing
        "52000+b03100=55100;55100+c70000=26100;",  # no answer mark
        "52+031=551;#",  # mark without digits
        "#26+1",  # junk after the digits
        "#261c",
        "#2;",
        "#²",  # a unicode digit is not an ASCII digit
        "#12#",
    ],
)
def test_extract_answer_malformed_is_none(text):
    assert arith.extract_answer(text) is None
