"""``capsedge serve`` under hostile clients: the README's "service under hostile clients" table.

Starts ``capsedge serve`` (default limits) on a free loopback port with its open files limited
to 256, then measures four cases one after another: stalled uploads, explanations whose
clients hang up, slow clients, and a deflated-DICOM bomb uploaded::

    python bench/hostile_clients.py --data DIR      # uploads Depuy.5.jpg of DIR (or --image X)
    python bench/hostile_clients.py --data DIR --pythonpath /tmp/old   # an older capsedge, for "before"

(``--pythonpath`` is put first on the server's ``PYTHONPATH``: a folder holding a
``capsedge`` link to another checkout's ``edge/``.)
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import common
from serve_burst import request, stop_server

FILE_LIMIT = 256


def deflated_bomb(inflated_mib: int) -> bytes:
    """A deflated-explicit-VR DICOM whose data set inflates to ``inflated_mib`` MiB of zeros."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(deflate.compress(struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, inflated_mib << 20)))
    zeros = bytes(1 << 20)
    for _ in range(inflated_mib):
        out.write(deflate.compress(zeros))
    out.write(deflate.flush())
    return out.getvalue()


def multipart(data: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self, pythonpath: str | None, image: bytes) -> None:
        self.image = image  # the X-ray the cases upload
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
        self.log = tempfile.NamedTemporaryFile(suffix=".log")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "capsedge.cli", "serve", "--port", "0"],
                                        stdout=self.log, stderr=self.log, env=env, preexec_fn=self._limit)
        deadline = time.monotonic() + 60
        while not (found := re.search(rb" on (http://(\S+):(\d+)/) ", Path(self.log.name).read_bytes())):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("capsedge serve did not start")
            time.sleep(0.2)
        self.url, self.host, self.port = found.group(1).decode(), found.group(2).decode(), int(found.group(3))
        while request(self.url, "GET", "api/health")[0] != 200:
            time.sleep(0.2)

    @staticmethod
    def _limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILE_LIMIT, hard))

    def rss(self, field: str = "VmRSS") -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024

    def post(self, data: bytes, timeout: float = 300) -> tuple[int, object]:
        body, content_type = multipart(data)
        return request(self.url, "POST", "api/classify", body, {"Content-Type": content_type}, timeout)

    def raw(self, target: str, content_type: str, length: int) -> bytes:
        return (f"POST {target} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    def stop(self) -> None:
        stop_server(self.process)
        self.log.close()


def bomb(server: Server) -> None:
    base = server.rss()
    status, answer = server.post(deflated_bomb(1536))
    print(f"deflated DICOM, 1.5 GiB inflated: {status} {answer}; "
          f"peak RSS +{server.rss('VmHWM') - base:.0f} MiB")


def stalled(server: Server) -> None:
    base = server.rss()
    body, content_type = multipart(b"")
    head = server.raw("/api/classify", content_type, 45 << 20) + body[: body.index(b"\r\n\r\n") + 4]
    clients = []
    for _ in range(20):
        sock = socket.create_connection((server.host, server.port))
        clients.append(sock)
        with contextlib.suppress(OSError):
            sock.sendall(head + bytes(40 << 20))
    time.sleep(1)
    print(f"20 clients stalled after 40 MB of a file part: RSS +{server.rss() - base:.0f} MiB")
    for sock in clients:
        sock.close()
    time.sleep(3)


def hung_up(server: Server) -> None:
    body, content_type = multipart(server.image)
    clients = []
    for _ in range(6):
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(server.raw("/api/classify?explain=1&grid=16", content_type, len(body)) + body)
        clients.append(sock)
    time.sleep(1)
    for sock in clients:
        sock.close()
    start = time.monotonic()
    status, _ = server.post(server.image)
    print(f"6 explain=1&grid=16 hung up after 1 s, then a classify: {status} "
          f"in {time.monotonic() - start:.1f} s")
    time.sleep(2)


def slow(server: Server) -> None:
    clients = []
    for _ in range(300):
        with contextlib.suppress(OSError):
            clients.append(socket.create_connection((server.host, server.port), timeout=2))
    for sock in clients[:100]:
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127")
    start = time.monotonic()
    status, _ = request(server.url, "GET", "api/health", timeout=10)
    print(f"300 slow clients, then /api/health: {status} in {time.monotonic() - start:.1f} s; "
          f"server open files {len(os.listdir(f'/proc/{server.process.pid}/fd'))}")
    time.sleep(12)
    still = 0
    for sock in clients:
        sock.setblocking(False)
        try:
            sock.recv(1)
        except BlockingIOError:
            still += 1
        except OSError:
            pass
        sock.close()
    emfile = b"Too many open files" in Path(server.log.name).read_bytes()
    print(f"after 12 s: {still} of {len(clients)} slow connections open; EMFILE in the log: {emfile}")


def main() -> None:
    parser = common.parser(__doc__, out=False)
    parser.add_argument("--image", type=Path, default=None, help="The X-ray to upload "
                        "(default: Depuy.5.jpg of --data).")
    parser.add_argument("--pythonpath", default=None, help="Put this first on the server's PYTHONPATH.")
    args = parser.parse_args()
    server = Server(args.pythonpath, (args.image or common.example_image(args)).read_bytes())
    try:
        for case in (stalled, hung_up, slow, bomb):  # the bomb last: freed memory stays mapped
            case(server)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
