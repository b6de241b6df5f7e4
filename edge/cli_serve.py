"""``capsedge serve``: its options, the checks before listening (token, address, open files),
and the start of the service (:mod:`capsedge.serve`, the ``serve`` extra)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from .boundary import error_boundary, fail_and_exit
from .cli_options import backend_option, model_option, threads_option
from .errors import CapsedgeError, reason
from .extras import require

MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Other than loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port; 0 picks a free one.")
@model_option()
@backend_option()
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Copies of the model in the server process, to run inferences in parallel.")
@threads_option(help="CPU threads of each copy of the model. Default: the usable cores (at most 4) for "
                     "one worker, else the usable cores shared among the workers.")
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
def serve(host: str, port: int, model_path: Path | None, backend: str, workers: int, threads: int | None,
          token: str | None,
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
    with error_boundary():
        server = require("capsedge.serve", extra="serve", needed_by="'capsedge serve'")
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
    if threads is None and workers > 1:  # several copies share the cores rather than each taking all
        threads = max(1, usable_cores() // workers)
    try:
        classifiers = [Classifier.load(model_path, backend=backend, threads=threads) for _ in range(workers)]
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
    from .serve_guards import LOOPBACK_HOSTS

    own = f"[{host.strip('[]')}]" if ":" in host else host
    return sorted({*LOOPBACK_HOSTS, own.lower()})
