"""`haltwise bench` (the main job): early stopping on a real decode loop.

On the same problems and seeds it runs (JSON "key" in brackets)
  [uncut] no early stopping: K traces per problem, majority vote;
  [deepconf_low], [deepconf_high] DeepConf online as its reference code does
      it: top-20 token confidence, 16 warm-up traces per problem (K/2 when K <
      32), the per-problem percentile threshold on the warm-up traces' lowest
      group confidence (low: keep 10%, high: keep 90%), the other traces cut
      live, votes filtered (lowest group confidence >= threshold) and
      weighted by lowest group confidence, a trace shorter than the window
      using its whole mean; the window scaled to our short traces (stated in
      the output's "deepconf" entry);
  [static] haltwise's own static strategy: a warm-up LOW_CONFIDENCE cut plus
      waves and group consensus (a settled vote drops the remaining traces);
  [policy] the adaptive policy (haltwise.policy), calibrated on the shipped
      trace bank (bundled task only);
and reports tokens, tokens saved vs [uncut], vote EM (with the standard error
of the paired EM difference), single-trace EM, tokens/s and wall time.
Because noise is keyed by (request, position), a cut trace is a prefix of its
twin in [uncut], so the EM differences are paired.

It also times the same loop with a plain torch multinomial step against the
Stepper (no cutting), and can sweep thresholds by replaying (a)'s traces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..decoding.parallel import EarlyStopSettings, ParallelSampler, PlannedSampler, RunResult
from ..decoding.runners import GPTRunner
from ..scheduler import StopReason
from ..tracebank import TraceBank, replay_warmup_cut
from .plain_stepper import PlainStepper


@dataclass(frozen=True)
class DecodeBenchConfig:
    problems: int = 500
    traces: int = 32
    temperature: float = 1.0
    seed: int = 0
    capacity: int = 256
    max_new_tokens: int = 160
    signal: str = "logprob"
    window: int = 16
    warmup: int = 4
    keep_percent: float = 90.0
    wave_size: int = 4
    consensus: str = "beta"
    consensus_threshold: float = 0.95
    throughput_problems: int = 100  # problems for the Stepper vs plain-torch throughput check
    deepconf_warmup: int = 16  # DeepConf's warm-up traces per problem (capped at K / 2)
    # DeepConf's 2,048-token window sits on reasoning traces of about 10^4 tokens (about 1/7 of a trace);
    # the bundled model's traces average 72 tokens (shipped bank), so the window here is 10 tokens
    deepconf_window: int = 10


DEEPCONF_SIGNAL = "topk_conf"  # DeepConf's token confidence: minus the mean log-probability of the top 20 tokens


def deepconf_setup(cfg: DecodeBenchConfig) -> dict:
    """How the DeepConf baselines run here (written into the bench JSON)."""
    return {"signal": DEEPCONF_SIGNAL, "top_k": 20, "warmup": min(cfg.deepconf_warmup, cfg.traces // 2),
            "window": cfg.deepconf_window, "budget": cfg.traces, "keep_percent": {"deepconf_low": 10.0,
                                                                                   "deepconf_high": 90.0},
            "window_note": "DeepConf's 2,048-token window is about 1/7 of its reasoning traces; the bundled "
                           "model's traces average 72 tokens, so the window is 10 tokens"}


def default_runs(cfg: DecodeBenchConfig) -> list[EarlyStopSettings]:
    if cfg.traces < 2:
        raise ValueError(f"haltwise bench: --traces must be >= 2 (warm-up plus cut traces), got {cfg.traces}")
    cfg = replace(cfg, warmup=min(cfg.warmup, cfg.traces - 1))
    base = EarlyStopSettings(traces=cfg.traces, signal=cfg.signal, window=cfg.window,
                             max_new_tokens=cfg.max_new_tokens)
    dc = deepconf_setup(cfg)
    deepconf = replace(base, signal=dc["signal"], window=dc["window"], warmup=dc["warmup"], vote="deepconf")
    return [
        replace(base, name="uncut (no early stopping)", key="uncut", record_signals=True),
        replace(deepconf, name="DeepConf-low (keep 10%)", key="deepconf_low",
                keep_percent=dc["keep_percent"]["deepconf_low"]),
        replace(deepconf, name="DeepConf-high (keep 90%)", key="deepconf_high",
                keep_percent=dc["keep_percent"]["deepconf_high"]),
        replace(base, name="static: cut + waves + consensus", key="static", warmup=cfg.warmup,
                keep_percent=cfg.keep_percent, wave_size=cfg.wave_size, consensus=cfg.consensus,
                consensus_threshold=cfg.consensus_threshold),
    ]


def paired_em_difference(run: RunResult, baseline: RunResult) -> tuple[float, float]:
    """(EM(run) - EM(baseline), its standard error), paired over problems."""
    d = run.correct_vector() - baseline.correct_vector()
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def run_row(run: RunResult, baseline: RunResult) -> dict:
    diff, se = paired_em_difference(run, baseline)
    return {
        "key": run.settings.key or run.settings.name,
        "name": run.settings.name,
        "tokens": run.tokens,
        "saved": 1.0 - run.tokens / baseline.tokens,
        "em": run.em,
        "em_single": run.em_single,
        "em_diff": diff,
        "em_diff_se": se,
        "tokens_per_s": run.loop.tokens_per_s,
        "wall_s": run.loop.wall_s,
        "cut_traces": sum(t.reason == StopReason.LOW_CONFIDENCE for p in run.problems for t in p.traces),
        "dropped_traces": sum(t.reason == StopReason.GROUP_CONSENSUS for p in run.problems for t in p.traces),
    }


def format_table(rows: Sequence[dict]) -> str:
    header = (f"{'run':<34} {'tokens':>9} {'saved':>7} {'vote EM':>8} {'dEM +- se':>16} {'EM 1':>6} "
              f"{'cut':>5} {'dropped':>7} {'tok/s':>8} {'wall s':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['name']:<34} {r['tokens']:>9d} {r['saved']:>6.1%} {r['em']:>8.3f} "
            f"{r['em_diff']:>+8.3f} +-{r['em_diff_se']:.3f} {r['em_single']:>6.3f} {r['cut_traces']:>5d} "
            f"{r['dropped_traces']:>7d} {r['tokens_per_s']:>8.0f} {r['wall_s']:>7.1f}"
        )
    lines.append("saved: fewer generated tokens than uncut; dEM: vote EM minus uncut's on the same problems and "
                 "seeds, with the standard error of the paired difference")
    return "\n".join(lines)


def bank_from_run(run: RunResult, difficulty: Sequence[int], meta: dict) -> TraceBank:
    """The uncut run's traces as a TraceBank (it must have record_signals)."""
    traces = []
    for problem in run.problems:
        row = []
        for t in problem.traces:
            if t.signals is None:
                raise ValueError("bank_from_run: the run must record signals (EarlyStopSettings.record_signals)")
            row.append({"answer": t.answer, "reason": int(t.reason), **t.signals})
        traces.append(row)
    return TraceBank.from_traces([p.reference for p in run.problems], difficulty, traces, meta=meta)


def sweep(bank: TraceBank, cfg: DecodeBenchConfig, keep_percents=(100, 95, 90, 80, 70, 60, 50, 40, 30, 20, 10)):
    """Tokens and vote EM of DeepConf online at each keep percentile, replayed on (a)'s traces."""
    out = []
    for keep in keep_percents:
        outcome = replay_warmup_cut(bank, warmup=cfg.warmup, keep_percent=keep, signal=cfg.signal,
                                    window=cfg.window)
        out.append({"keep_percent": keep, "tokens": outcome.total_tokens, "em": outcome.em})
    return out


def plot(path: str, rows: Sequence[dict], sweep_rows: Sequence[dict], baseline_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [1 - r["tokens"] / baseline_tokens for r in sweep_rows]
    ax.plot(xs, [r["em"] for r in sweep_rows], "o-", color="tab:blue", label="DeepConf online, replayed sweep")
    for x, r in zip(xs, sweep_rows):
        ax.annotate(f"{r['keep_percent']}%", (x, r["em"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for r, marker in zip(rows, "s^Dv*"):
        ax.plot([r["saved"]], [r["em"]], marker, markersize=9, label=r["name"])
    ax.set_xlabel("tokens saved vs no early stopping")
    ax.set_ylabel("vote exact match")
    ax.set_title("haltwise: tokens vs accuracy (labels: warm-up keep percentile)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def throughput_check(sampler: ParallelSampler, problems, cfg: DecodeBenchConfig) -> dict:
    """tokens/s of the loop with haltwise.Stepper (no cutting) vs a plain torch step, same problems."""
    settings = EarlyStopSettings(name="throughput", traces=cfg.traces, max_new_tokens=cfg.max_new_tokens,
                                 signal=cfg.signal, window=cfg.window)
    subset = problems[: cfg.throughput_problems]
    results = {}
    for name, factory in (("haltwise", None),
                          ("plain", lambda s: PlainStepper(s, temperature=cfg.temperature, seed=cfg.seed))):
        run = sampler.run(subset, settings, stepper_factory=factory)
        results[name] = run.loop.tokens_per_s
    return {"haltwise_tokens_per_s": results["haltwise"], "plain_tokens_per_s": results["plain"],
            "ratio": results["haltwise"] / results["plain"]}


BANK_STREAM = "bank"  # the problems of the shipped trace bank: their own stream, no eval prompt


def bank_problems(n: int):
    """The bundled bank's problems: drawn from their own seed stream and never
    an eval-set prompt, so a policy calibrated on the bank is evaluated on
    problems it has not seen."""
    from ..tasks import arith

    return [p for p in arith.generate_problems(2 * n, BANK_STREAM) if not arith.is_eval_prompt(p.prompt)][:n]


def bundled_setup(cfg: DecodeBenchConfig, weights: str | None = None, problems=None,
                  engine: str = "haltwise") -> dict:
    """The bundled model and (by default) the eval set; max_new_tokens is
    capped so prompt + trace fit the model's context. engine "haltwise": the
    model as haltwise's GPT; "hf": the same checkpoint as transformers loads
    it (NemotronForCausalLM) under the same decode loop (HFRunner), so every
    run of the bench, the policy included, runs on transformers' forward."""
    from ..tasks import arith
    from ..tasks.adapters import ArithTask

    torch.set_grad_enabled(False)
    problems = problems if problems is not None else arith.eval_set(cfg.problems)
    max_prompt = max(len(arith.prompt_ids(p)) for p in problems)
    runner: Callable[[int, int], object]
    if engine == "hf":
        from ..decoding.hf_runner import HFRunner, load_causal_lm
        from ..models import BUNDLED_CHECKPOINT

        hf_model = load_causal_lm(weights or BUNDLED_CHECKPOINT)
        max_seq_len = hf_model.config.max_position_embeddings
        runner = lambda capacity, max_len: HFRunner(hf_model, pad_id=arith.PAD_ID)  # noqa: E731
    elif engine == "haltwise":
        from ..models.gpt import load_pretrained

        model, config = load_pretrained(weights)
        max_seq_len = config.max_seq_len
        runner = lambda capacity, max_len: GPTRunner(model, capacity, max_len=max_len)  # noqa: E731
    else:
        raise ValueError(f"bundled_setup: engine must be 'haltwise' or 'hf', got {engine!r}")
    cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, max_seq_len - max_prompt))
    max_len = max_prompt + cfg.max_new_tokens
    return dict(cfg=cfg, problems=problems, task=ArithTask(), runner_factory=lambda capacity: runner(capacity, max_len))


def adaptive_policy_run(cfg: DecodeBenchConfig) -> Callable:
    """Run "policy": a Policy calibrated on the shipped trace bank
    (its own problem stream, never eval prompts: labelled control requests
    with every candidate threshold replayed), then serving the benchmark's
    problems, one policy request per problem, learning from their labels as
    it goes (haltwise.policy.sampling.run_adaptive). Bundled task only."""

    def run(sampler: PlannedSampler, problems, baseline: RunResult, progress=None) -> RunResult:
        from ..policy import Policy, PolicyConfig
        from ..policy.sampling import calibrate_from_bank, run_adaptive
        from ..tracebank import BUNDLED_BANK

        bank = TraceBank.load(BUNDLED_BANK)
        # one bucket: the bank's 256 problems certify it at the first checkpoint; a bucket per difficulty
        # would hold 64 each and serve the benchmark on warm-up and boosted control slices. The value in
        # force may rise every request (it only ever moves among certified candidates).
        policy = Policy(PolicyConfig(traces=cfg.traces, signal=cfg.signal, window=cfg.window, raise_interval=1))
        calibrate_from_bank(policy, bank)
        return run_adaptive(sampler, problems, policy, max_new_tokens=cfg.max_new_tokens,
                            request_offset=bank.num_problems, progress=progress)

    return run


# Why an engine's bench lacks a run of default_runs + policy (the JSON's "skipped")
POLICY_BUNDLED_ONLY = "the adaptive policy is calibrated on the bundled task's trace bank (bundled task only)"


def bench_payload(engine: str, cfg: DecodeBenchConfig, results: Sequence[RunResult], skipped: dict[str, str]) -> dict:
    """The bench JSON every engine writes: rows by run_row against the first
    run (uncut), the DeepConf setup, and the runs this engine did not do
    with the reason."""
    baseline = results[0]
    return {"engine": engine, "baseline": baseline.settings.name, "config": dict(cfg.__dict__),
            "runs": [run_row(r, baseline) for r in results], "skipped": dict(skipped),
            "deepconf": deepconf_setup(cfg)}


def bench_decode(cfg: DecodeBenchConfig, *, problems=None, task=None, runner_factory: Callable | None = None,
                 runs: Sequence[EarlyStopSettings] | None = None, progress: bool = True,
                 bank_path: str | None = None, extra_runs: Sequence[Callable] = (), weights: str | None = None,
                 engine: str = "haltwise") -> dict:
    """Runs (a), (b), (c) [+ extra_runs] and the throughput check. Returns the JSON payload.
    Without problems / task / runner_factory: the bundled model on `engine`
    (bundled_setup), with the policy run."""
    from tqdm import tqdm

    skipped: dict[str, str] = {}
    if problems is None or task is None or runner_factory is None:
        setup = bundled_setup(cfg, weights, engine=engine)
        cfg, problems, task, runner_factory = setup["cfg"], setup["problems"], setup["task"], setup["runner_factory"]
        extra_runs = [*extra_runs, adaptive_policy_run(cfg)]
    else:
        skipped["policy"] = POLICY_BUNDLED_ONLY
    sampler = ParallelSampler(runner_factory, task, capacity=cfg.capacity, temperature=cfg.temperature,
                              seed=cfg.seed, top_k_conf=20)
    runs = list(runs or default_runs(cfg))
    results: list[RunResult] = []
    for settings in runs:
        total = len(problems) * settings.traces
        with tqdm(total=total, desc=settings.name, unit="trace", disable=not progress, leave=False) as bar:
            results.append(sampler.run(problems, settings, progress=bar.update))
    for extra in extra_runs:
        with tqdm(total=len(problems) * cfg.traces, desc="extra run", unit="trace", disable=not progress,
                  leave=False) as bar:
            results.append(extra(sampler, problems, results[0], progress=bar.update))
    baseline = results[0]
    payload = bench_payload(engine, cfg, results, skipped)
    difficulty = [getattr(task, "difficulty", lambda p: 0)(p) for p in problems]
    bank = bank_from_run(baseline, difficulty, meta={"temperature": cfg.temperature, "seed": cfg.seed,
                                                     "traces": cfg.traces, "source": "haltwise bench (a)"})
    payload["sweep"] = sweep(bank, cfg)
    if bank_path:
        bank.save(bank_path)
    if cfg.throughput_problems:
        payload["throughput"] = throughput_check(sampler, problems, cfg)
    return payload
