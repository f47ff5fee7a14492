"""GPU check of the triton backend: correctness against the torch backend and
a float64 reference on CUDA, then timing against torch eager and a copy.

For a CUDA machine with torch, triton, cmake and pybind11 but no network and
no pip: builds haltwise._core with plain cmake, copies it and kernels/*.py
into python/haltwise/ (build outputs, gitignored) and imports haltwise from
python/. Installs nothing. Writes $OUT/gpu_check.json (OUT defaults to ./out)
and prints a table last.

    python bench/gpu_check.py             # on the GPU machine
    python bench/gpu_check.py --dry-run   # CPU, TRITON_INTERPRET=1, tiny sizes, no build

Bandwidth, per case (bytes = the logits' size):
    kernel GB/s = bytes / t_kernel            (the logits are read once)
    copy GB/s   = 2 * bytes / t_copy          (dst.copy_(logits) reads and writes them)
    % of copy   = kernel GB/s / copy GB/s     (100% = reads at the copy's bandwidth)
Times are medians of triton.testing.do_bench: each call after an L2 flush
(cold cache, like a decode step), its launch queued while the flush runs. The
JSON also holds CUDA-graph replay medians for triton and the copy (warm L2,
no launch cost at all); torch eager is not captured (not every op can be).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

TOP_K_CONF = 20
CUDA_CASES = [  # (batch, vocab, dtype name, temperatures)
    (1, 32000, "float32", (0.0, 1.0)),
    (1, 32000, "bfloat16", (0.0, 1.0)),
    (64, 128256, "float32", (0.0, 1.0)),
    (64, 128256, "bfloat16", (0.0, 1.0)),
    (256, 32000, "float32", (0.0, 1.0)),
    (256, 32000, "bfloat16", (0.0, 1.0)),
    (256, 151936, "bfloat16", (0.0, 1.0)),
]
DRY_CASES = [(1, 1500, "float32", (0.0, 1.0)), (4, 700, "bfloat16", (0.0, 1.0))]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ATOL, RTOL = 1e-4, 1e-4  # against float64: float32 accumulation over up to 152k columns
SWEEP_SECONDS = 90  # no new sweep starts after this long (compiles dominate)


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- build ----


def build_extension() -> dict:
    """Copies kernels/*.py into python/haltwise/kernels/ (first: the triton
    checks need only these), then cmake-builds _core and copies it beside them."""
    package = os.path.join(REPO, "python", "haltwise")
    kernels = os.path.join(package, "kernels")
    os.makedirs(kernels, exist_ok=True)
    for source in glob.glob(os.path.join(REPO, "kernels", "*.py")):
        shutil.copy2(source, kernels)
    import pybind11

    build_dir = os.path.join(REPO, "build", "gpu")
    configure = [
        "cmake", "-S", REPO, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    build = ["cmake", "--build", build_dir, "--target", "_core", "-j", str(os.cpu_count() or 4)]
    started = time.perf_counter()
    for command in (configure, build):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    built = glob.glob(os.path.join(build_dir, "_core*.so"))
    if not built:
        raise RuntimeError(f"no _core*.so under {build_dir} after the build")
    for stale in glob.glob(os.path.join(package, "_core*.so")):
        os.remove(stale)
    shutil.copy2(built[0], package)
    return {"seconds": round(time.perf_counter() - started, 1), "core": os.path.basename(built[0])}


def use_source_tree() -> None:
    """Imports haltwise from python/. An editable install would still send
    haltwise.kernels and haltwise._core to its own copies through its import
    hook, so that hook goes."""
    sys.path.insert(0, os.path.join(REPO, "python"))
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]


# ------------------------------------------------------------ reference ----


def reference64(x: torch.Tensor, top_k_conf: int) -> dict:
    """float64 signals of valid rows (on x's device), from the definitions in docs/signals.md."""
    x = x.double()
    lse = torch.logsumexp(x, -1)
    logp = x - lse[:, None]
    p = logp.exp()
    top = logp.topk(max(top_k_conf, 2), -1).values
    return {
        "lse": lse,
        "entropy": -(p * logp).sum(-1),
        "confidence": top[:, 0].exp(),
        "margin": top[:, 0].exp() - top[:, 1].exp(),
        "topk_conf": -top[:, :top_k_conf].mean(-1),
    }


def check_case(x, temperature, seed, offset, salt) -> dict:
    """triton vs float64 (values), vs torch "philox" (tokens: equal but at float ties), vs argmax."""
    from haltwise import signals
    from haltwise.reference import gumbel_noise, signals_torch

    out = signals(x, temperature=temperature, top_k_conf=TOP_K_CONF, seed=seed, offset=offset, backend="triton")
    ref_torch = signals_torch(x, temperature=temperature, top_k_conf=TOP_K_CONF, seed=seed, offset=offset, salt=salt)
    ref = reference64(x, TOP_K_CONF)
    x64 = x.double()
    result = {"status_ok": bool((out.status == 0).all())}
    errors = {}
    for name in ("entropy", "confidence", "margin", "topk_conf"):
        want = ref[name]
        for backend, got in (("triton", getattr(out, name)), ("torch", getattr(ref_torch, name))):
            err = (got.double() - want).abs() / (ATOL + RTOL * want.abs())
            errors[f"{backend}_{name}"] = float(err.max())  # <= 1 passes
    logprob_want = x64.gather(1, out.token[:, None]).squeeze(1) - ref["lse"]
    errors["triton_logprob"] = float(((out.logprob.double() - logprob_want).abs()
                                      / (ATOL + RTOL * logprob_want.abs())).max())
    result["worst_error_over_tolerance"] = errors
    result["values_ok"] = all(v <= 1.0 for k, v in errors.items() if k.startswith("triton"))

    if temperature == 0.0:
        result["tokens_differing"] = int((out.token != x.float().argmax(-1)).sum())
        result["tokens_ok"] = result["tokens_differing"] == 0 and bool((out.token == ref_torch.token).all())
    else:
        differ = (out.token != ref_torch.token).nonzero().flatten()
        result["tokens_differing"] = int(differ.numel())
        ties = True
        if differ.numel():
            rows = x64[differ]
            inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
            g = gumbel_noise(seed[differ], offset[differ], salt[differ], x.shape[1]).double()
            scores = rows * inv_t + g
            a = scores.gather(1, out.token[differ, None]).squeeze(1)
            b = scores.gather(1, ref_torch.token[differ, None]).squeeze(1)
            ties = bool(((a - b).abs() <= 1e-6 * torch.maximum(a.abs(), b.abs()).clamp(min=1.0)).all())
        result["tokens_ok"] = ties
    result["ok"] = result["status_ok"] and result["values_ok"] and result["tokens_ok"]
    return result


def check_bad_rows(device) -> dict:
    """NaN / +inf / all -inf rows beside valid ones: statuses and placeholders like torch's."""
    from haltwise import signals

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 5000, generator=g) * 3).to(device)
    x[1, 4999] = float("nan")
    x[2, 17] = float("inf")
    x[3] = float("-inf")
    x[4, 100] = float("nan")
    x[4, 200] = float("inf")
    ok = True
    for temperature in (0.0, 1.0):
        out = signals(x, temperature=temperature, top_k_conf=5, seed=1, offset=2, backend="triton")
        want = signals(x, temperature=temperature, top_k_conf=5, seed=1, offset=2, backend="torch")
        ok &= out.status.tolist() == [0, 1, 2, 4, 3, 0] == want.status.tolist()
        ok &= bool((out.token[1:5] == 0).all()) and all(bool((f[1:5] == 0).all()) for f in out[1:6])
        ok &= bool((out.token[[0, 5]] == want.token[[0, 5]]).all())
    return {"ok": bool(ok)}


def check_native_tokens(x, seed, offset) -> dict:
    """Sampled tokens of triton (this device) vs the native C++ kernel (CPU)."""
    from haltwise import signals

    a = signals(x, temperature=1.0, seed=seed, offset=offset, backend="triton").token.cpu()
    b = signals(x.cpu(), temperature=1.0, seed=seed.cpu(), offset=offset.cpu(), backend="native").token
    return {"ok": bool((a == b).all()), "tokens_differing": int((a != b).sum())}


# --------------------------------------------------------------- timing ----


def time_ms(fn, *, graph: bool = False) -> float | None:
    """Median milliseconds of fn: do_bench (L2 flushed before each call) or
    CUDA-graph replays (graph). On CPU (dry run) a plain wall clock."""
    if not torch.cuda.is_available():  # dry run: the code path, not a measurement
        samples = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3
    import triton.testing

    try:
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    except Exception as err:
        log(f"timing failed ({'graph' if graph else 'do_bench'}): {err!r}")
        return None


def time_case(x, temperature, seed, offset, salt) -> dict:
    from haltwise import signals
    from haltwise.benchmarks.signals import torch_eager

    dst = torch.empty_like(x)
    triton_fn = lambda: signals(x, temperature=temperature, top_k_conf=TOP_K_CONF, seed=seed,  # noqa: E731
                                offset=offset, backend="triton")
    copy_fn = lambda: dst.copy_(x)  # noqa: E731
    timing = {
        "triton_ms": time_ms(triton_fn),
        "torch_eager_ms": time_ms(lambda: torch_eager(x, temperature, TOP_K_CONF)),
        "copy_ms": time_ms(copy_fn),
        "triton_graph_ms": time_ms(triton_fn, graph=True),
        "copy_graph_ms": time_ms(copy_fn, graph=True),
    }
    nbytes = x.numel() * x.element_size()
    t, t_copy, t_torch = timing["triton_ms"], timing["copy_ms"], timing["torch_eager_ms"]
    if t and t_copy:
        timing["kernel_gbps"] = nbytes / t / 1e6
        timing["copy_gbps"] = 2 * nbytes / t_copy / 1e6
        timing["pct_of_copy"] = 100 * timing["kernel_gbps"] / timing["copy_gbps"]
    if t and t_torch:
        timing["speedup_vs_torch"] = t_torch / t
    return timing


def sweep_configs(x, temperature, seed, offset) -> list[dict]:
    """Times the planned launch config and its neighbours (block, segments): data to tune plan()."""
    from haltwise import signals_triton as st

    batch, vocab = x.shape
    planned = st.plan(batch, vocab, sample=temperature > 0, device=x.device)
    blocks = [64, 128] if DRY_RUN else [1024, 2048, 4096]
    configs = {planned}
    for block in blocks:
        configs.add(planned._replace(block=block, num_warps=4 if block <= 1024 else 8))
    for segments in (1, max(1, planned.num_segments // 2), planned.num_segments * 2):
        configs.add(planned._replace(num_segments=min(segments, st.MAX_SEGMENTS)))
    rows = []
    for config in sorted(configs):
        def run(config=config):
            return st.launch(x, temperature=temperature, top_k_conf=TOP_K_CONF, seed=seed, offset=offset,
                             salted=False, config=config)

        rows.append({"block": config.block, "num_segments": st.segments(vocab, config)[1],
                     "num_warps": config.num_warps, "planned": config == planned, "ms": time_ms(run)})
    return rows


# ----------------------------------------------------------------- main ----


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes, no build")
    parser.add_argument("--no-sweep", action="store_true", help="skip timing alternative launch configs")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict = {"dry_run": args.dry_run}
    if not args.dry_run:
        if not torch.cuda.is_available():
            log("no CUDA device: use --dry-run on a CPU machine")
            return 2
        try:
            report["build"] = build_extension()
        except Exception as err:  # the checks of the triton backend do not need _core
            report["build"] = {"error": str(err)[-4000:]}
            log(f"build failed; going on without the native backend:\n{err}")
        use_source_tree()
    # dry run: the installed (editable) haltwise, its kernels included
    import haltwise
    import triton

    if not args.dry_run:
        import haltwise.kernels.signals

        source = os.path.join(REPO, "python", "haltwise")
        if not haltwise.kernels.signals.__file__.startswith(source):
            log(f"haltwise.kernels comes from {haltwise.kernels.signals.__file__}, not {source}")
            return 2

    device = torch.device("cuda" if not args.dry_run else "cpu")
    report["versions"] = {"torch": torch.__version__, "triton": triton.__version__,
                          "haltwise_from": os.path.dirname(haltwise.__file__)}
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
    log(f"haltwise from {report['versions']['haltwise_from']}, triton {triton.__version__}")

    cases = []
    sweep_deadline = started + SWEEP_SECONDS
    for batch, vocab, dtype_name, temperatures in DRY_CASES if args.dry_run else CUDA_CASES:
        g = torch.Generator().manual_seed(batch * 1000003 + vocab)
        x = (torch.randn(batch, vocab, generator=g) * 3.0).to(DTYPES[dtype_name]).to(device)  # std of an LM head
        seed = torch.arange(batch, dtype=torch.int64, device=device) + 11
        offset = torch.full((batch,), 5, dtype=torch.int64, device=device)
        salt = torch.zeros(batch, dtype=torch.int64, device=device)  # per-row seeds: unsalted
        for temperature in temperatures:
            name = f"{batch}x{vocab} {dtype_name} T={temperature:g}"
            log(name)
            case = {"name": name, "batch": batch, "vocab": vocab, "dtype": dtype_name, "temperature": temperature,
                    "top_k_conf": TOP_K_CONF}
            try:
                case["check"] = check_case(x, temperature, seed, offset, salt)
                case["timing"] = time_case(x, temperature, seed, offset, salt)
                if not args.no_sweep and time.perf_counter() < sweep_deadline:
                    case["sweep"] = sweep_configs(x, temperature, seed, offset)
            except Exception as err:
                case["error"] = repr(err)
                log(f"{name}: {err!r}")
            cases.append(case)
    report["cases"] = cases
    report["bad_rows"] = check_bad_rows(device)
    if args.dry_run or "error" not in report.get("build", {}):
        g = torch.Generator().manual_seed(9)
        x = torch.randn(4, 32000 if not args.dry_run else 500, generator=g).to(device)
        ids = torch.arange(4, dtype=torch.int64, device=device)
        report["native_tokens"] = check_native_tokens(x, ids + 100, ids * 3)
    report["seconds"] = round(time.perf_counter() - started, 1)

    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)

    failed = failures(report)
    print_table(cases, report, path, failed)
    return 1 if failed else 0


def failures(report: dict) -> list[str]:
    """Names of the failed checks of a report: cases that raised or came out
    wrong, then bad_rows and native_tokens."""
    failed = [c["name"] for c in report["cases"] if "error" in c or not c["check"]["ok"]]
    if not report["bad_rows"]["ok"]:
        failed.append("bad_rows")
    if not report.get("native_tokens", {"ok": True})["ok"]:
        failed.append("native_tokens")
    return failed


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(cases, report, path, failed) -> None:
    unit = "ms" if report["dry_run"] else "us"
    scale = 1.0 if report["dry_run"] else 1e3
    header = (f"{'case':34s} {'ok':>3s} {'triton':>9s} {'torch':>9s} {'copy':>9s} {'GB/s':>7s} "
              f"{'%copy':>6s} {'x torch':>7s} {'best cfg':>14s}")
    kind = "interpreter, not a measurement" if report["dry_run"] else "do_bench medians, cold L2"
    print(f"\ntimes in {unit} ({kind}); GB/s = bytes read / t; %copy vs 2*bytes / t_copy; {path}")
    print(header)
    print("-" * len(header))
    for case in cases:
        timing = case.get("timing", {})
        sec = lambda key: None if timing.get(key) is None else timing[key] * scale  # noqa: E731
        best = min((r for r in case.get("sweep", []) if r["ms"] is not None), key=lambda r: r["ms"], default=None)
        best_cfg = "-" if best is None else f"{best['block']}/{best['num_segments']}{'*' if best['planned'] else ''}"
        ok = "ERR" if "error" in case else ("yes" if case["check"]["ok"] else "NO")
        print(f"{case['name']:34s} {ok:>3s} {fmt(sec('triton_ms'), '9.1f')} {fmt(sec('torch_eager_ms'), '9.1f')} "
              f"{fmt(sec('copy_ms'), '9.1f')} {fmt(timing.get('kernel_gbps'), '7.0f')} "
              f"{fmt(timing.get('pct_of_copy'), '6.1f')} {fmt(timing.get('speedup_vs_torch'), '7.2f')} "
              f"{best_cfg:>14s}")
    print(f"bad rows: {'ok' if report['bad_rows']['ok'] else 'FAILED'}; native tokens: "
          f"{report.get('native_tokens', {}).get('ok', 'not run (no build)')}; "
          f"best cfg = block/segments of the fastest config tried (* = the planned one); {report['seconds']} s")
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")


if __name__ == "__main__":
    sys.exit(main())
