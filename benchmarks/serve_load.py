"""`cada serve` under load: many concurrent clients on loopback, every answer accounted for.

    python benchmarks/serve_load.py MODEL IMAGE [IMAGE ...] [--requests 2000] [--clients 200] [--workers 1]
                                    [--compare-predict]

Starts `cada serve MODEL` on a free loopback port in its own process, then --clients threads send --requests
requests between them, one image each, cycling through the images. A 503 (the queue is full) is an answer: the
client waits its Retry-After and sends the request again, as a well-behaved client does. It prints the throughput
(images scored per second), the latency of the answered requests (p50, p99: from the first try to the 200), the
answers by kind (200, 503 with JSON and Retry-After, anything else) and the failures by kind (connection reset,
timeout, not JSON), which must be none, and the server's peak resident memory (VmHWM, its workers' summed).
With --compare-predict it also runs `cada predict MODEL IMAGES` on the same images and prints the server's
throughput as a share of predict's. Linux only (/proc). Run it alone: the clients share the machine's cores with
the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def peak_memory_mib(pid: int) -> float:
    """VmHWM of the process and of its children (the workers), summed."""
    total, pids = 0.0, [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return round(total, 1)


class Load:
    """The clients' tallies (under a lock: many threads write them)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answers: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.examples: dict[str, str] = {}

    def count(self, table: Counter, kind: str, example: str = "") -> None:
        with self.lock:
            table[kind] += 1
            self.examples.setdefault(kind, example)


def one_request(port: int, name: str, data: bytes, load: Load, retries: int = 120) -> None:
    """Send one image until it is scored (a 503 is retried after its Retry-After); tally what came back."""
    started = time.perf_counter()
    for _ in range(retries):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            connection.request("POST", "/predict", body=data, headers={"X-Image-Name": name})
            response = connection.getresponse()
            status, body, retry = response.status, response.read(), response.getheader("Retry-After")
        except ConnectionResetError as error:
            return load.count(load.failures, "connection reset", str(error))
        except TimeoutError as error:
            return load.count(load.failures, "timeout", str(error))
        except OSError as error:
            return load.count(load.failures, type(error).__name__, str(error))
        finally:
            connection.close()
        try:
            json.loads(body)
        except ValueError:
            return load.count(load.failures, f"{status} not JSON", body[:100].decode("latin-1"))
        if status == 503 and retry:
            load.count(load.answers, "503 JSON with Retry-After")
            time.sleep(float(retry))
            continue
        load.count(load.answers, str(status))
        if status == 200:
            with load.lock:
                load.latencies.append(time.perf_counter() - started)
        return None
    return load.count(load.failures, "refused every retry")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def predict_throughput(model: str, images: list[Path]) -> float:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-m", "cada", "predict", model, *map(str, images), "--out", out + "/p", "--quiet"],
            capture_output=True,
            text=True,
            check=True,
        )
    return float(done.stdout.split(" images/s")[0].rsplit(";", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--compare-predict", action="store_true")
    parser.add_argument("--serve-option", action="append", default=[], help="passed to cada serve, e.g. --max-queue=32")
    args = parser.parse_args()
    images = [(path.name, path.read_bytes()) for path in args.images]
    with socket.socket() as probe:  # a free port (the server binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "cada", "serve", args.model, "--port", str(port), "--quiet"]
    command += ["--workers", str(args.workers), *args.serve_option]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    load = Load()
    try:
        assert server.stdout is not None
        print(server.stdout.readline().strip()[:200])
        for _ in range(1200):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health/ready")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        for i in range(min(10, args.requests)):  # warm-up, not counted
            one_request(port, *images[i % len(images)], Load())
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for i in range(args.requests):
                pool.submit(one_request, port, *images[i % len(images)], load)
        seconds = time.perf_counter() - started
        peak = peak_memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=120)
    scored = load.answers["200"]
    throughput = scored / seconds
    print(
        f"{args.requests} requests from {args.clients} clients, {args.workers} worker(s): {scored} scored in "
        f"{seconds:.1f} s = {throughput:.2f} images/s; latency p50 {percentile(load.latencies, 0.5):.2f} s, "
        f"p99 {percentile(load.latencies, 0.99):.2f} s"
    )
    print("answers: " + ", ".join(f"{kind} x{count}" for kind, count in sorted(load.answers.items())))
    lost = sum(load.failures.values())
    print(f"failures: {lost}" + "".join(f"\n  {kind} x{n}: {load.examples[kind]}" for kind, n in load.failures.items()))
    print(f"server peak memory (VmHWM, workers summed): {peak} MiB")
    if args.compare_predict:
        alone = predict_throughput(args.model, args.images)
        print(f"cada predict on the same {len(args.images)} images: {alone} images/s; serve: {throughput / alone:.0%}")
    return 1 if lost or scored < args.requests else 0


if __name__ == "__main__":
    raise SystemExit(main())
