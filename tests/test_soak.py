"""The short soak: a stream of policy requests through Stepper + Scheduler +
Policy with groups, cancels, refused and clashing admissions, QueueFull,
labels and user reports. Every request ends exactly once (run_soak raises
SoakError otherwise) and the policy's records agree. `python bench/soak.py`
runs the long one (10^6 requests) and reports the RSS."""
from haltwise.benchmarks.soak import run_soak


def test_every_request_ends_exactly_once(tmp_path):
    result = run_soak(1500, traces=4, capacity=64, max_queue=96, seed=1, db=str(tmp_path / "soak.db"))
    assert result.ended == result.requests == 1500
    # every path was taken
    assert result.observed and result.cancelled and result.rejected
    assert result.queue_full and result.clashes and result.labels and result.user_reports
    assert result.traces >= 4 * (result.observed + result.cancelled) * 0.5  # groups of traces (fewer in overload)
    assert result.rss_growth_mb() < 64
    assert 0 < result.max_groups <= 64 + 96  # released as they end: at most the running and queued ones
