"""The docs are a contract: every repository path cited in code, comments and
docs exists, and the reference values stated in docs/ hold.

The values in the docs' tables are checked twice: against a float64
evaluation of the documented formulas written here (so the docs are right),
and against the implementation (so the code does what the docs say).
"""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

import haltwise
from haltwise import _core
from haltwise import reference as torch_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")

# ------------------------------------------------------------ cited paths ----

SCANNED_DIRS = ("csrc", "kernels", "python", "tests", "bench", "notes", "docs", "tools", ".ci")
SCANNED_ROOT_FILES = ("README.md", "pyproject.toml", "CMakeLists.txt")
TEXT_SUFFIXES = (".py", ".pyi", ".h", ".cc", ".md", ".toml", ".txt", ".sh", ".cfg")
SKIPPED_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis", "build", "out"}
# Build outputs inside the source tree (gitignored: copies made by bench/gpu_check.py).
SKIPPED_PATHS = {os.path.join("python", "haltwise", "kernels")}
CITED_SUFFIXES = "md|h|cc|py|pyi|json|toml|sh|npz|safetensors|png|txt"
# a path: optional ../ prefixes, at least one directory, a known suffix; or a bare *.md name
PATH_RE = re.compile(
    rf"(?<![\w./$-])((?:\.\./)*(?:[\w.][\w.-]*/)+[\w.-]+\.(?:{CITED_SUFFIXES})|[\w.][\w.-]*\.md)(?![\w/])"
)
# Names that are not repository files: paths the code writes or that a user chooses.
NOT_REPOSITORY_FILES = {
    "out/gpu_check.json",  # bench/gpu_check.py's output under $OUT
    "bench/results/replay_seedS.json",  # a pattern in bench/RESULTS.md: S = 0, 1, 2 (those are checked below)
}
# This file cites missing paths on purpose (to test the scan).
THIS_FILE = os.path.abspath(__file__)


def scanned_files() -> list[str]:
    files = [os.path.join(REPO, f) for f in SCANNED_ROOT_FILES]
    for top in SCANNED_DIRS:
        for root, dirs, names in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS
                       and os.path.relpath(os.path.join(root, d), REPO) not in SKIPPED_PATHS]
            files += [os.path.join(root, n) for n in names if n.endswith(TEXT_SUFFIXES)]
    return sorted(f for f in files if os.path.isfile(f) and os.path.abspath(f) != THIS_FILE)


def resolves(cited: str, citing_file: str) -> bool:
    """A cited path names a file or folder relative to the repository root, to
    the citing file's folder, or (for code in the package) to python/ or the
    package. A bare name (no folder) may be any scanned file of that name."""
    bases = [REPO, os.path.dirname(citing_file), os.path.join(REPO, "python"), os.path.join(REPO, "python", "haltwise")]
    for base in bases:
        full = os.path.normpath(os.path.join(base, cited))
        # Only files inside the repository count: a clone may sit beside other folders.
        if os.path.commonpath([full, REPO]) == REPO and os.path.exists(full):
            return True
    return "/" not in cited and any(os.path.basename(f) == cited for f in scanned_files())


def cited_paths() -> list[tuple[str, int, str]]:
    """(file, line, path) of every path-like citation in the scanned files."""
    found = []
    for path in scanned_files():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if "://" in line:  # URLs name no repository file
                    line = re.sub(r"\w+://\S+", "", line)
                if line.startswith("#include <"):  # system and third-party headers
                    continue
                for match in PATH_RE.finditer(line):
                    found.append((os.path.relpath(path, REPO), number, match.group(1)))
    return found


def test_the_scan_sees_the_citations_it_must():
    """Guards the scan itself: known citations are found, a missing file would be caught."""
    cited = {(f, p) for f, _, p in cited_paths()}
    assert ("csrc/philox.h", "docs/sampling.md") in cited
    assert ("python/haltwise/signals.py", "docs/signals.md") in cited
    assert (os.path.join("docs", "README.md"), "signals.md") in cited
    assert ("README.md", "RESULTS.md") in cited
    for missing in ("docs/DESIGN.md", "../shared/DESIGN.md", "DESIGN.md", "csrc/philox.hh", "notes/nothing.md"):
        assert not resolves(missing, os.path.join(REPO, "csrc", "signals_cpu.h"))
    for seed in (0, 1, 2):  # the files behind the pattern in NOT_REPOSITORY_FILES
        assert os.path.isfile(os.path.join(REPO, "bench", "results", f"replay_seed{seed}.json"))
    assert len(scanned_files()) > 50


def test_every_cited_path_exists():
    missing = [f"{f}:{n}: {p}" for f, n, p in cited_paths()
               if p not in NOT_REPOSITORY_FILES and not resolves(p, os.path.join(REPO, f))]
    assert not missing, "citations of files that do not exist:\n" + "\n".join(missing)


# ---------------------------------------------------------- table parsing ----


def doc_table(page: str, marker: str) -> list[dict[str, str]]:
    """The rows of the markdown table after `<!-- marker: ... -->` in docs/page,
    as {header: cell} with backticks stripped."""
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- {marker}:"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")])
    header, rule, body = rows[0], rows[1], rows[2:]
    assert set("".join(rule)) <= set("- "), f"{page}: {marker} is not a markdown table"
    assert body, f"{page}: {marker} has no rows"
    return [dict(zip(header, row)) for row in body]


def parse_logits(cell: str) -> list[float]:
    return [float(v) for v in cell.strip("[]").split(",")]  # float() reads nan, inf, -inf


# ------------------------------------------------- float64 references ----

M32 = 0xFFFFFFFF


def philox(counter, key) -> list[int]:
    """Philox 4x32-10 on Python ints (Salmon et al. 2011), for the known answers."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return [c0, c1, c2, c3]


def noise_mapping(seed: int, offset: int, salt: int, column: int) -> tuple[tuple[int, ...], tuple[int, int], int]:
    """(counter, key, word) of a column, as docs/sampling.md defines them."""
    seed, offset = seed % 2**64, offset % 2**64
    counter = ((column >> 6) * 16 + (column & 15), offset & M32, offset >> 32, salt)
    return counter, (seed & M32, seed >> 32), (column >> 4) & 3


def gumbel64(bits: int) -> tuple[float, float]:
    u = ((bits >> 8) + 0.5) / 2**24
    return u, -math.log(-math.log(u))


def signals64(x: list[float], k: int) -> dict[str, float]:
    """The greedy signals of one row from the formulas of docs/signals.md, float64."""
    if any(math.isnan(v) for v in x) or any(v == math.inf for v in x) or all(v == -math.inf for v in x):
        status = (1 if any(math.isnan(v) for v in x) else 0) | (2 if math.inf in x else 0)
        status |= 0 if any(math.isfinite(v) for v in x) else 4
        return dict(token=0, logprob=0.0, entropy=0.0, confidence=0.0, margin=0.0, topk_conf=0.0, status=status)
    finite = [v for v in x if v > -math.inf]
    m = max(finite)
    lse = m + math.log(math.fsum(math.exp(v - m) for v in finite))
    logp = sorted((v - lse for v in finite), reverse=True)
    kk = min(k, len(logp))
    token = x.index(m)
    return dict(
        token=token,
        logprob=x[token] - lse,
        entropy=min(max(-math.fsum(math.exp(lp) * lp for lp in logp), 0.0), math.log(len(x))),
        confidence=math.exp(logp[0]),
        margin=math.exp(logp[0]) - (math.exp(logp[1]) if len(logp) > 1 else 0.0),
        topk_conf=-math.fsum(logp[:kk]) / kk if k > 0 else 0.0,
        status=0,
    )


# ------------------------------------------------------- signals.md ----

SIGNAL_FIELDS = ("logprob", "entropy", "confidence", "margin", "topk_conf")
SIGNAL_EXAMPLES = doc_table("signals.md", "signals-examples")


def test_signals_examples_cover_the_contract():
    statuses = {int(row["status"]) for row in SIGNAL_EXAMPLES}
    assert {0, 1, 2, 4} <= statuses and any(s & 3 == 3 for s in statuses)
    assert any("-inf" in row["logits"] and row["status"] == "0" for row in SIGNAL_EXAMPLES)  # masked columns
    assert any(row["k"] == "1" for row in SIGNAL_EXAMPLES)


@pytest.mark.parametrize("row", SIGNAL_EXAMPLES, ids=lambda r: f"{r['logits']} k={r['k']}")
def test_signals_examples_are_the_formulas(row):
    want = signals64(parse_logits(row["logits"]), int(row["k"]))
    assert int(row["token"]) == want["token"] and int(row["status"]) == want["status"]
    for field in SIGNAL_FIELDS:
        assert abs(float(row[field]) - want[field]) <= 5.1e-7, f"docs say {field} = {row[field]}, formula {want[field]}"


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("row", SIGNAL_EXAMPLES, ids=lambda r: f"{r['logits']} k={r['k']}")
def test_signals_examples_hold(row, backend):
    logits = torch.tensor([parse_logits(row["logits"])], dtype=torch.float32)
    out = haltwise.signals(logits, temperature=0.0, top_k_conf=int(row["k"]), backend=backend)
    assert out.token.item() == int(row["token"])
    assert out.status.item() == int(row["status"])
    for field in SIGNAL_FIELDS:
        got = getattr(out, field).item()
        assert math.isclose(got, float(row[field]), rel_tol=2e-5, abs_tol=2e-6), f"{field}: {got} vs docs {row[field]}"


# ------------------------------------------------------- sampling.md ----

PHILOX_KAT = doc_table("sampling.md", "philox-kat")
NOISE_KAT = doc_table("sampling.md", "noise-kat")
SAMPLE_KAT = doc_table("sampling.md", "sample-kat")


def hex_words(cell: str) -> list[int]:
    return [int(w, 16) for w in cell.split()]


@pytest.mark.parametrize("row", PHILOX_KAT, ids=lambda r: r["counter"][:8])
def test_philox_known_answers(row):
    counter, key, output = hex_words(row["counter"]), hex_words(row["key"]), hex_words(row["output"])
    assert philox(counter, key) == output
    assert list(_core.philox4x32_10(counter, key)) == output
    assert [int(w) for w in torch_reference.philox4x32_10(*counter, *key)] == output


@pytest.mark.parametrize("row", NOISE_KAT, ids=lambda r: f"seed{r['seed']}-col{r['column']}")
def test_noise_mapping_known_answers(row):
    seed, offset, salt, column = (int(row[k]) for k in ("seed", "offset", "salt", "column"))
    counter, key, word = noise_mapping(seed, offset, salt, column)
    assert [int(c) for c in row["counter"].split()] == list(counter)
    assert int(row["word"]) == word
    bits = philox(counter, key)[word]
    assert int(row["bits"], 16) == bits
    u, g = gumbel64(bits)
    assert float(row["u"]) == u  # exact: 24 bits
    assert abs(float(row["g"]) - g) <= 5.1e-7
    # the implementations: the core's Philox, and the torch backend's per-column mapping
    assert _core.philox4x32_10(list(counter), list(key))[word] == bits
    as_row = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    signed = lambda v: v - 2**64 if v >= 2**63 else v  # noqa: E731
    args = (as_row(signed(seed % 2**64)), as_row(signed(offset % 2**64)), as_row(salt), column + 1)
    assert torch_reference.random_bits(*args)[0, column].item() == bits
    assert math.isclose(torch_reference.gumbel_noise(*args)[0, column].item(), g, rel_tol=1e-6, abs_tol=1e-6)


def sample_logits(cell: str) -> list[float]:
    zeros = re.fullmatch(r"(\d+) zeros", cell)
    if zeros:
        return [0.0] * int(zeros.group(1))
    sines = re.fullmatch(r"(\S+) sin\(j\)`?, j = 0 \.\. (\d+)", cell)
    if sines:
        return [float(sines.group(1)) * math.sin(j) for j in range(int(sines.group(2)) + 1)]
    raise AssertionError(f"docs/sampling.md: logits {cell!r} in no form this test reads")


def sample64(x: list[float], temperature: float, seed: int, offset: int, salt: int) -> tuple[int, float]:
    """The Gumbel-max token in float64 (x_j * fl32(1/T) + g_j), and the gap to the runner-up."""
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    scores = []
    for j, v in enumerate(x):
        counter, key, word = noise_mapping(seed, offset, salt, j)
        scores.append(v * inv_t + gumbel64(philox(counter, key)[word])[1])
    best = max(range(len(x)), key=lambda j: (scores[j], -j))
    ranked = sorted(scores, reverse=True)
    return best, ranked[0] - ranked[1]


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("row", SAMPLE_KAT, ids=lambda r: f"{r['logits'][:10]}-salt{r['salt'][:1]}")
def test_sampled_tokens_known_answers(row, backend):
    x = sample_logits(row["logits"])
    temperature, seed, offset = float(row["T"]), int(row["seed"]), int(row["offset"])
    salt = int(row["salt"].split()[0])
    token, gap = sample64(x, temperature, seed, offset, salt)
    assert gap > 1e-3, "a near tie: the example would not pin the noise down"
    assert int(row["token"]) == token
    if salt == 0:  # per-row seed and offset: unsalted
        logits = torch.tensor([x])
        out = haltwise.signals(logits, temperature=temperature, seed=torch.tensor([seed]),
                               offset=torch.tensor([offset]), backend=backend)
        assert out.token.item() == token
    else:  # scalars: row r is salted with r
        logits = torch.tensor([x] * (salt + 1))
        out = haltwise.signals(logits, temperature=temperature, seed=seed, offset=offset, backend=backend)
        assert out.token[salt].item() == token


# ---------------------------------------------- constants the docs name ----


def test_status_codes_match_the_docs():
    rows = doc_table("signals.md", "status-codes")
    assert {r["constant"]: int(r["value"]) for r in rows} == {
        "haltwise.STATUS_OK": haltwise.STATUS_OK, "haltwise.STATUS_NAN": haltwise.STATUS_NAN,
        "haltwise.STATUS_POSINF": haltwise.STATUS_POSINF, "haltwise.STATUS_NO_FINITE": haltwise.STATUS_NO_FINITE,
    }
    assert (_core.STATUS_NAN, _core.STATUS_POSINF, _core.STATUS_NO_FINITE) == (1, 2, 4)


def test_stop_reasons_match_the_docs():
    rows = doc_table("stop-rules.md", "stop-reasons")
    assert {r["reason"]: int(r["value"]) for r in rows} == {r.name: r.value for r in haltwise.StopReason}


def test_conf_signals_match_the_docs():
    from haltwise.scheduler import CONF_SIGNALS

    rows = doc_table("stop-rules.md", "conf-signals")
    assert [r["low_conf_signal"].split()[0].strip('"`') for r in rows] == list(CONF_SIGNALS)
    assert haltwise.StopConfig().low_conf_signal == "topk_conf"
