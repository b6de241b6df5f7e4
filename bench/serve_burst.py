"""A burst against ``capsedge serve``: requests/s, p50/p99 latency, the server's peak memory.

Starts ``capsedge serve`` on a free loopback port, sends two warm-up requests,
then REQUESTS uploads of one X-ray from CLIENTS threads at once, and reads the
server's peak resident memory (VmHWM in /proc/<pid>/status) before stopping it::

    python bench/serve_burst.py --data DIR            # Depuy.5.jpg of DIR (or --image X)
    python bench/serve_burst.py --data DIR --screenshot --out docs   # also the README's docs/serve.png
    python bench/serve_burst.py --data DIR --model FILE   # another exported model, e.g. the last release's

tests/test_serve.py runs the same server and burst (and checks every answer).
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import common

#: Chromium as root in a container: no sandbox, no GPU, nothing phoned home.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_server(*args: str, log: IO[bytes], timeout: float = 60.0,
                 command: Sequence[str] = (sys.executable, "-m", "capsedge.cli"),
                 ) -> tuple[subprocess.Popen, str]:
    """Start ``COMMAND serve --port 0 ARGS``, wait until it is healthy; return it and its URL.

    ``command`` runs capsedge (this Python's, by default). The server's output (its messages
    and uvicorn's access log) goes to ``log``.
    """
    process = subprocess.Popen([*command, "serve", "--port", "0", *args], stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"capsedge serve exited with status {process.returncode}")
            found = re.search(rb" on (http://\S+/) ", Path(log.name).read_bytes())
            if found:
                url = found.group(1).decode()
                status, _ = request(url, "GET", "api/health", timeout=5)
                if status == 200:
                    return process, url
            time.sleep(0.1)
        raise RuntimeError(f"capsedge serve not healthy after {timeout:.0f} s")
    except BaseException:
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen) -> None:
    """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, Any]:
    """One HTTP request to the server (loopback); the status and the decoded JSON answer."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, "/" + path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    except OSError:
        return 0, None
    finally:
        connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, None


def post_image(url: str, data: bytes, filename: str = "xray.jpg", timeout: float = 60.0,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """``POST /api/classify`` with ``data`` as the multipart field ``file``."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    all_headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})}
    return request(url, "POST", "api/classify", body, all_headers, timeout)


def burst(url: str, data: bytes, requests: int = 40, clients: int = 8,
          filename: str = "xray.jpg") -> tuple[float, list[tuple[float, int, Any]]]:
    """Send ``requests`` uploads from ``clients`` threads at once.

    Returns the wall time of the whole burst and, per request, (seconds, status, answer).
    """

    def one(_: int) -> tuple[float, int, Any]:
        start = time.perf_counter()
        status, answer = post_image(url, data, filename)
        return time.perf_counter() - start, status, answer

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    return time.perf_counter() - start, results


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024


def screenshot(url: str, image: Path, out: Path) -> None:
    """Load the page in headless Chromium, classify ``image`` with its explanation, save a PNG
    of the page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 620})
            page.goto(url)
            page.check("#explain")  # the picture shows the explanation too
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result[data-state=done]", timeout=120_000)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--image", type=Path, default=None, help="The X-ray to send "
                        "(default: Depuy.5.jpg of --data).")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="capsedge serve --workers.")
    parser.add_argument("--model", type=Path, default=None, help="capsedge serve --model "
                        "(default: the bundled model).")
    parser.add_argument("--screenshot", action="store_true", help="Also save a picture of the page "
                        "as OUT/serve.png.")
    args = parser.parse_args()
    args.image = args.image or common.example_image(args)
    picture = common.out_path(args, "serve.png") if args.screenshot else None
    if args.screenshot and picture is None:
        parser.error("--screenshot needs --out")

    data = args.image.read_bytes()
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        model = ["--model", str(args.model)] if args.model else []
        process, url = start_server("--workers", str(args.workers), *model, log=log)
        try:
            for _ in range(2):
                post_image(url, data)
            wall, results = burst(url, data, args.requests, args.clients)
            peak = peak_rss_mib(process.pid)
            if picture is not None:
                screenshot(url, args.image, picture)
        finally:
            stop_server(process)
    latencies = sorted(1000 * seconds for seconds, _, _ in results)
    failed = sum(status != 200 for _, status, _ in results)
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
    print(f"{args.requests} requests from {args.clients} clients, --workers {args.workers}: "
          f"{args.requests / wall:.1f} requests/s, p50 {statistics.median(latencies):.0f} ms, "
          f"p99 {p99:.0f} ms, failed {failed}, server peak RSS {peak:.0f} MiB")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
