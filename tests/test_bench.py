"""`capsedge bench`: the figures are produced and shaped as documented."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from capsedge.bench import benchmark
from capsedge.cli import main


def test_benchmark_measures_the_bundled_model() -> None:
    result = benchmark(None, runs=20, warmup=2)
    assert result.backend == "litert" and result.threads == 1 and result.runs == 20 and result.views == 4
    assert 0 < result.median_ms <= result.p90_ms <= result.p99_ms
    assert result.throughput > 0 and result.load_ms > 0 and result.preprocess_ms > 0
    assert 10 < result.peak_rss_mb < 4096
    with pytest.raises(ValueError, match="runs"):
        benchmark(None, runs=0)


def test_bench_command_json_rows_per_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from capsedge import progress

    monkeypatch.setattr(progress, "SHOW_AFTER_SECONDS", 0.0)  # show even this quick work
    result = CliRunner().invoke(main, ["bench", "--json", "--runs", "5", "--warmup", "1", "--threads", "1,2"])
    assert result.exit_code == 0, result.stderr
    assert [line.split(" (")[0] for line in result.stderr.splitlines()][-1] == "bench auto, 2 threads: 6/6"
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["threads"] for row in rows] == [1, 2]
    assert set(rows[0]) == {"backend", "threads", "load_ms", "preprocess_ms", "views", "median_ms", "p90_ms",
                            "p99_ms", "throughput", "peak_rss_mb", "runs"}


def test_bench_command_table_and_errors() -> None:
    result = CliRunner().invoke(main, ["bench", "--runs", "3", "--warmup", "0"])
    assert result.exit_code == 0 and "median ms" in result.stdout and "litert" in result.stdout
    bad = CliRunner().invoke(main, ["bench", "--runs", "3", "--backend", "nope"])
    assert bad.exit_code == 1 and "unknown backend 'nope'" in bad.stderr
    bad = CliRunner().invoke(main, ["bench", "--threads", "one"])
    assert bad.exit_code == 1 and "comma-separated integers" in bad.stderr
    for threads in ("0", "100000", ","):
        bad = CliRunner().invoke(main, ["bench", "--threads", threads])
        assert bad.exit_code == 1 and "from 1 to 64" in bad.stderr
