"""``capsedge bench``: time the model on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .boundary import EXIT_FAILED, fail
from .cli_options import backend_option, model_option, threads_option
from .errors import CapsedgeError


@click.command()
@model_option()
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="Input image. Default: a generated picture.")
@backend_option(many=True)
@threads_option(many=True)
@click.option("--runs", type=click.IntRange(1), default=200, show_default=True,
              help="Timed classifications (each runs the model's test-time views).")
@click.option("--warmup", type=click.IntRange(0), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per configuration.")
def bench(model_path: Path | None, image: Path | None, backends: list[str], thread_counts: list[int],
          runs: int, warmup: int, as_json: bool) -> None:
    """Time the model on this machine: load, latency percentiles, throughput, memory."""
    from .bench import benchmark, machine_summary
    from .progress import Progress

    header = f"{'backend':8s} {'threads':>7s} {'load ms':>8s} {'prep ms':>8s} {'views':>5s} " \
             f"{'median ms':>9s} {'p90 ms':>7s} {'p99 ms':>7s} {'per s':>8s} {'peak MiB':>8s}"
    if not as_json:
        click.echo(f"# {machine_summary()}; {runs} runs after {warmup} warm-up")
        click.echo(header)
    failed = False
    for backend in backends:
        for count in thread_counts:
            try:
                with Progress(f"bench {backend}, {count} threads") as bar:
                    result = benchmark(model_path, image, backend=backend, threads=count, runs=runs,
                                       warmup=warmup, progress=bar.update)
            except (CapsedgeError, ValueError) as exc:
                fail(f"{backend}, {count} threads: {exc}")
                failed = True
                continue
            if as_json:
                click.echo(json.dumps(result.to_dict()))
            else:
                r = result
                click.echo(f"{r.backend:8s} {r.threads:7d} {r.load_ms:8.1f} {r.preprocess_ms:8.2f} "
                           f"{r.views:5d} {r.median_ms:9.3f} {r.p90_ms:7.3f} {r.p99_ms:7.3f} "
                           f"{r.throughput:8.1f} {r.peak_rss_mb:8.1f}")
    if failed:
        sys.exit(EXIT_FAILED)
