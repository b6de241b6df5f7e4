"""The ``capsedge`` command. Thin: it parses options, calls the library, prints."""

from __future__ import annotations

import csv
import importlib
import ipaddress
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .boundary import EXIT_FAILED, error_boundary, fail, fail_and_exit, printable
from .errors import CapsedgeError, ImageError, reason
from .outputs import refuse_overwrite

if TYPE_CHECKING:
    from .classifier import Prediction


#: What text output and the page lead with for an out-of-distribution image, instead of a maker.
NOT_AN_XRAY = "not a shoulder-implant X-ray"


def confidence_note(prediction: Prediction) -> str:
    """The answer's confidence with its flag: ``"90.0 %, uncertain"``, ``"25.4 %, uncalibrated"``."""
    flags = {None: ", uncalibrated", True: ", uncertain", False: ""}
    flag = flags[prediction.uncertain]
    return f"{100 * prediction.confidence:.1f} %{flag}"


def format_text(path: str, prediction: Prediction) -> str:
    """One line per image: the answer with its confidence and flags, then every class's probability;
    an out-of-distribution image leads with :data:`NOT_AN_XRAY` and names no maker."""
    if prediction.out_of_distribution:
        return f"{printable(path)}: {NOT_AN_XRAY}, no answer: {prediction.ood_reason}"
    scores = "  ".join(f"{name} {100 * p:5.1f} %" for name, p in prediction.probabilities.items())
    return f"{printable(path)}: {prediction.label} ({confidence_note(prediction)})   {scores}"


class LazyGroup(click.Group):
    """Subcommands that need TensorFlow are imported only when they are run."""

    lazy = {
        "train": ("capsedge.train.cli", "command", "Train a model on labelled X-rays [train extra]."),
        "export": ("capsedge.export.cli", "command", "Export a trained model [export extra]."),
        "capsules": ("capsedge.train.capsule_view", "command",
                     "Perturb the winning capsule's dimensions through the decoder [train extra]."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(60)) for name, cmd in self.commands.items()]
        rows += [(name, summary) for name, (_, _, summary) in self.lazy.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, attribute, _ = self.lazy[name]
        try:
            return getattr(importlib.import_module(module), attribute)
        except ImportError as exc:
            extra = "export" if name == "export" else "train"
            fail(f"'capsedge {name}' needs {exc.name or 'more packages'}: "
                 f"pip install 'capsedge[{extra}]'")
            sys.exit(EXIT_FAILED)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="capsedge")
def main() -> None:
    """Identify a shoulder implant's manufacturer from an X-ray.

    A research tool, not a medical device: confirm every result by other means.
    """


@main.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="An exported model. Default: the bundled model.")
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="Input image. Default: a generated picture.")
@click.option("--backend", "backends", default="auto", show_default=True,
              help="Comma-separated: auto (from the model file), litert, onnxruntime, edgetpu.")
@click.option("--threads", "thread_counts", default="1", show_default=True,
              help="Comma-separated thread counts, e.g. 1,2,4.")
@click.option("--runs", type=click.IntRange(1), default=200, show_default=True,
              help="Timed classifications (each runs the model's test-time views).")
@click.option("--warmup", type=click.IntRange(0), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per configuration.")
def bench(model_path: Path | None, image: Path | None, backends: str, thread_counts: str, runs: int,
          warmup: int, as_json: bool) -> None:
    """Time the model on this machine: load, latency percentiles, throughput, memory."""
    from .bench import benchmark, machine_summary
    from .progress import Progress

    try:
        threads = [int(t) for t in thread_counts.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or not all(1 <= t <= 64 for t in threads):
        fail_and_exit(f"--threads must be comma-separated integers from 1 to 64, got {thread_counts!r}")
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if not names:
        fail_and_exit(f"--backend must name at least one backend, got {backends!r}")
    header = f"{'backend':8s} {'threads':>7s} {'load ms':>8s} {'prep ms':>8s} {'views':>5s} " \
             f"{'median ms':>9s} {'p90 ms':>7s} {'p99 ms':>7s} {'per s':>8s} {'peak MiB':>8s}"
    if not as_json:
        click.echo(f"# {machine_summary()}; {runs} runs after {warmup} warm-up")
        click.echo(header)
    failed = False
    for backend in names:
        for count in threads:
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


SERVE_PACKAGES = ("starlette", "uvicorn", "python_multipart", "anyio")
MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Other than loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port; 0 picks a free one.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="An exported model (.tflite or .onnx). Default: the bundled model.")
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Copies of the model in the server process, to run inferences in parallel.")
@click.option("--token", envvar="CAPSEDGE_TOKEN", default=None,
              help="Require 'Authorization: Bearer TOKEN' on every API call (or set CAPSEDGE_TOKEN).")
@click.option("--max-upload-mb", type=click.IntRange(1, 1024), default=50, show_default=True,
              help="Largest accepted image file, in MiB.")
@click.option("--max-uploads", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Requests holding an upload in memory at once (reading, queued, classified); "
                   "more get 503.")
@click.option("--body-timeout", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True,
              help="Seconds an upload may take to arrive (then 408).")
@click.option("--header-timeout", type=click.FloatRange(0.1, 600), default=10.0, show_default=True,
              help="Seconds a client may take to send a request's headers (then the connection closes).")
@click.option("--max-connections", type=click.IntRange(2, 4096), default=64, show_default=True,
              help="Open connections at most; the oldest idle one makes room for a new one.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A Host name to answer (repeatable; '*' for any). Default: on a loopback "
                   "--host, its loopback names; otherwise any.")
def serve(host: str, port: int, model_path: Path | None, workers: int, token: str | None,
          max_upload_mb: int, max_uploads: int, body_timeout: float, header_timeout: float,
          max_connections: int, allowed_hosts: tuple[str, ...]) -> None:
    """Serve the classifier over HTTP: a JSON API and a page for the browser [serve extra]."""
    if token is not None and (len(token) < MIN_TOKEN_LENGTH or not token.isascii()
                              or not token.isprintable() or " " in token):
        fail_and_exit(f"--token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters "
                      "without spaces")
    if not is_loopback(host):
        if token is None:
            fail_and_exit(f"refusing to listen on {host} without --token: other machines could reach it")
        click.echo(f"capsedge: warning: listening on {host}, reachable from the network over plain HTTP; "
                   "every API call needs the token", err=True)
    try:
        from . import serve as server
    except ImportError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in SERVE_PACKAGES:
            raise
        fail_and_exit(f"'capsedge serve' needs {package}: pip install 'capsedge[serve]'")
    from .classifier import Classifier, usable_cores

    spare = open_files_limit() - FILES_BESIDE_CONNECTIONS
    if spare < max_connections:
        fail_and_exit(f"--max-connections {max_connections} needs more open files than this process "
                      f"may have ({spare + FILES_BESIDE_CONNECTIONS}, 'ulimit -n'); lower it or raise "
                      "the limit")
    try:
        sock = server.listen(host, port)
    except OSError as exc:
        fail_and_exit(f"cannot listen on {host} port {port} ({reason(exc)})")
    # Several copies share the cores rather than each taking all of them.
    threads = None if workers == 1 else max(1, usable_cores() // workers)
    try:
        classifiers = [Classifier.load(model_path, threads=threads) for _ in range(workers)]
    except CapsedgeError as exc:
        sock.close()
        fail_and_exit(str(exc))
    app = server.create_app(classifiers, token=token, max_upload_bytes=max_upload_mb * server.MIB,
                            max_uploads=max_uploads, body_timeout=body_timeout,
                            allowed_hosts=host_names(host, allowed_hosts))
    address = sock.getsockname()
    shown = f"[{address[0]}]" if ":" in address[0] else address[0]
    click.echo(f"capsedge: serving {classifiers[0].metadata.version} on http://{shown}:{address[1]}/ "
               "(Ctrl-C to stop)", err=True)
    server.run(app, sock, header_timeout=header_timeout, max_connections=max_connections)


#: Open files the server needs besides its connections (the model, libraries, the log, the
#: listening socket, a classification's file reads).
FILES_BESIDE_CONNECTIONS = 32


def open_files_limit() -> int:
    """This process's open-file limit (``ulimit -n``); very large where it cannot be read."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1 << 30
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def host_names(host: str, allowed: tuple[str, ...]) -> list[str] | None:
    """The Host names the service answers: ``allowed`` (``None`` for ``*``); by default, on a
    loopback address, its loopback names (a page elsewhere reaching the port by DNS rebinding
    sends its own name and is refused), and on another address any name (the token guards it)."""
    if "*" in allowed:
        return None
    if allowed:
        return list(allowed)
    if not is_loopback(host):
        return None
    from .serve import LOOPBACK_HOSTS

    own = f"[{host.strip('[]')}]" if ":" in host else host
    return sorted({*LOOPBACK_HOSTS, own.lower()})


def expand_inputs(paths: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Files as given; a directory becomes its images (recursively, sorted).

    Inside a directory, files with an image suffix and files with no suffix
    (DICOM exports often have none) are taken; hidden files are skipped. Each
    entry is ``(path, None)``, or ``(path, reason)`` for a folder or entry that
    could not be read (it fails alone; the walk goes on).
    """
    from .folders import walk_images

    entries: list[tuple[str, str | None]] = []
    for given in paths:
        folder = Path(given)
        try:
            is_folder = bool(given) and folder.is_dir()
        except (OSError, ValueError):  # a name too long, a folder we may not search: classify reports it
            is_folder = False
        if not is_folder:
            entries.append((given, None))
            continue
        found, problems = walk_images(folder, allow_no_suffix=True)
        walked = [(str(path), None) for path in found] + [(str(path), why) for path, why in problems]
        entries.extend(sorted(walked, key=lambda entry: entry[0]))
    return entries


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str, readable=False))
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    default=None,
    help="An exported model (.tflite or .onnx). Default: the bundled model.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per image.")
@click.option("--backend", default="auto", show_default=True,
              help="auto (from the model file), litert, onnxruntime or edgetpu.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write one row per image to this CSV file.")
@click.option("--threads", type=click.IntRange(1, 64), default=None,
              help="CPU threads for inference. Default: the usable cores, at most 4.")
def classify(images: tuple[str, ...], model_path: Path | None, as_json: bool, backend: str,
             csv_path: Path | None, threads: int | None) -> None:
    """Classify X-ray images (PNG, JPEG, TIFF, BMP, DICOM, ...) or folders of them."""
    from .classifier import Classifier

    with error_boundary():
        classifier = Classifier.load(model_path, backend=backend, threads=threads)

    files = expand_inputs(images)
    if not files:
        fail_and_exit("no images found in " + ", ".join(images))
    if csv_path is not None:
        with error_boundary():
            refuse_overwrite(csv_path, [path for path, _ in files] + [classifier.model_path], "--csv")
    rows: list[dict[str, object]] = []
    failed = 0
    for image, problem in files:
        try:
            if problem is not None:
                raise ImageError(problem)
            prediction = classifier.classify(image)
        except CapsedgeError as exc:
            failed += 1
            fail(f"{image}: {exc}")
            rows.append({"path": image, "error": str(exc)})
            if as_json:
                click.echo(json.dumps({"path": image, "error": str(exc)}, allow_nan=False))
            continue
        record = {"path": image, **prediction.to_dict()}
        rows.append(record)
        if as_json:
            click.echo(json.dumps(record, allow_nan=False))  # strict JSON: NaN is refused upstream
        else:
            click.echo(format_text(image, prediction))
    if csv_path is not None:
        try:
            write_csv(csv_path, rows, classifier.labels)
        except OSError as exc:
            fail_and_exit(f"cannot write {csv_path} ({reason(exc)})")
    if failed:
        if len(files) > 1:
            fail(f"{failed} of {len(files)} images failed")
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("image", type=click.Path(path_type=str, readable=False))
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Overlay PNG to write. Default: <image name>.explain.png in this folder.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="An exported model. Default: the bundled model.")
@click.option("--backend", default="auto", show_default=True, help="auto, litert, onnxruntime or edgetpu.")
@click.option("--grid", type=click.IntRange(2, 32), default=8, show_default=True,
              help="Squares per side hidden in turn (one inference each, after the answer's).")
@click.option("--threads", type=click.IntRange(1, 64), default=None,
              help="CPU threads for inference. Default: the usable cores, at most 4.")
@click.option("--json", "as_json", is_flag=True, help="Print the heat grid and figures as JSON.")
def explain(image: str, out_path: Path | None, model_path: Path | None, backend: str, grid: int,
            threads: int | None, as_json: bool) -> None:
    """Show where the model looked: an occlusion heat map over the X-ray, as a PNG."""
    from .classifier import Classifier
    from .explain import occlusion_map, render_overlay
    from .progress import Progress

    out = out_path if out_path is not None else Path(Path(image).name + ".explain.png")
    with error_boundary():
        classifier = Classifier.load(model_path, backend=backend, threads=threads)
        refuse_overwrite(out, [image, classifier.model_path], "--out")
    bar = Progress("explain")
    try:
        explanation = occlusion_map(classifier, image, grid, progress=bar.update)
    except CapsedgeError as exc:
        bar.close()
        fail_and_exit(f"{printable(image)}: {exc}")
    bar.close()
    try:
        render_overlay(explanation).save(out, format="PNG")
    except OSError as exc:
        fail_and_exit(f"cannot write {out} ({reason(exc)})")
    if as_json:
        click.echo(json.dumps({"path": image, "overlay": str(out), **explanation.to_dict()}))
    else:
        p = explanation.prediction
        answer = (f"{NOT_AN_XRAY}, no answer: {p.ood_reason}" if p.out_of_distribution
                  else f"{p.label} ({confidence_note(p)})")
        click.echo(f"{printable(image)}: {answer}; overlay {printable(str(out))} "
                   f"({explanation.inferences} inferences, {explanation.seconds:.1f} s)")


def write_csv(path: Path, rows: list[dict[str, object]], labels: tuple[str, ...]) -> None:
    """One row per image: path, label, answer (empty out of distribution), one probability column
    per class, latency, model version, the flags with their threshold and reason, error."""
    # surrogateescape: file names that are not valid UTF-8 are written back byte for byte.
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "answer", *(f"p_{label}" for label in labels), "latency_ms",
                         "model_version", "uncertain", "threshold", "out_of_distribution", "ood_reason",
                         "error"])
        for row in rows:
            probabilities = row.get("probabilities") or {}
            threshold = row.get("threshold")
            writer.writerow([
                _cell(row["path"]),
                _cell(row.get("label", "")),
                _cell(row.get("answer") or ""),
                *(f"{probabilities[label]:.6f}" if probabilities else "" for label in labels),
                row.get("latency_ms", ""),
                _cell(row.get("model_version", "")),
                _csv_flag(row.get("uncertain")),
                "" if threshold is None else threshold,
                _csv_flag(row.get("out_of_distribution")),
                _cell(row.get("ood_reason") or ""),
                _cell(row.get("error", "")),
            ])


def _csv_flag(value: object) -> str:
    return "" if value is None else str(bool(value)).lower()


#: A cell starting with one of these is a formula to a spreadsheet (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    """A text cell a spreadsheet shows as text: a leading ``'`` before a formula character."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


if __name__ == "__main__":
    main()
