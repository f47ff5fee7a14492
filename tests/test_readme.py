"""The README's usage examples must run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(*, vllm: bool) -> list[str]:
    """The README's python blocks: those that use vLLM, or the others."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if ("import vllm" in b) == vllm]


def test_readme_usage_example_runs(capsys):
    blocks = python_blocks(vllm=False)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert sum(1 for line in printed if line.strip()) == 6  # every submitted request ended once


def test_readme_vllm_example_compiles():
    (block,) = python_blocks(vllm=True)
    compile(block, "README.md", "exec")


@pytest.mark.slow
def test_readme_vllm_example_runs():
    pytest.importorskip("vllm")  # .ci/vllm.sh runs this with vLLM installed
    (block,) = python_blocks(vllm=True)
    scope = {"__name__": "__main__"}
    exec(compile(block, "README.md", "exec"), scope)
    (request,) = scope["out"]
    assert request.outputs[0].token_ids, "the example generated nothing"
