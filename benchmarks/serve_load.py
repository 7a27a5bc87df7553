"""Does `cada serve` answer many requests without failing and without its memory growing?

    python benchmarks/serve_load.py MODEL IMAGE [IMAGE ...] [--requests 1000] [--clients 4]

Starts `cada serve MODEL` on a free loopback port in its own process, then sends --requests requests from
--clients threads, cycling through: one image, a batch of up to 4 with overlays, and a file that is not an image
(which must get a 400). It reports the failures (a wrong status or an unreadable answer) and the server's
resident memory (VmRSS) after the first 50 requests and at the end, and its peak (VmHWM): memory that keeps
growing with the number of requests would show as an end RSS well above the early one. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"
    }


def send(url: str, number: int, images: list[tuple[str, bytes]]) -> str | None:
    """One request of the cycle; None when the answer is as expected, else what was wrong."""
    kind = number % 3
    if kind == 0:
        name, data = images[number % len(images)]
        body, headers, expected, path = data, {"X-Image-Name": name}, 200, "/predict"
    elif kind == 1:
        batch = [images[(number + i) % len(images)] for i in range(min(4, len(images)))]
        (body, headers), expected, path = multipart(batch), 200, "/predict?overlay=1"
    else:
        body, headers, expected, path = b"not an image" * 10, {"X-Image-Name": "bad"}, 400, "/predict"
    request = urllib.request.Request(url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, answer = error.code, error.read()
    except OSError as error:
        return f"request {number}: {error}"
    if status != expected:
        return f"request {number}: status {status}, expected {expected}: {answer[:200]!r}"
    try:
        json.loads(answer)
    except ValueError:
        return f"request {number}: the answer is not JSON"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    images = [(path.name, path.read_bytes()) for path in args.images]
    with socket.socket() as probe:  # a free port (the server binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "cada", "serve", args.model, "--port", str(port), "--quiet"],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        print(server.stdout.readline().strip()[:200])
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        warm = min(50, args.requests)
        failures = [f for f in (send(url, i, images) for i in range(warm)) if f]
        early = memory_mib(server.pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            failures += [f for f in pool.map(lambda i: send(url, i, images), range(warm, args.requests)) if f]
        seconds = time.perf_counter() - started
        end = memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(
        f"{args.requests} requests ({args.clients} clients after {warm} warm-up), {len(failures)} failed, "
        f"{seconds:.1f} s for the last {args.requests - warm}"
    )
    print(
        f"server memory: RSS {early['VmRSS']} MiB after {warm} requests, {end['VmRSS']} MiB at the end; "
        f"peak {end['VmHWM']} MiB"
    )
    for failure in failures[:10]:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
