"""`cada serve`: its arguments; the server is cada.serve."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from cada.commands.options import add_device_options, positive_int
from cada.files import printable


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run folder, or an exported model (.onnx, or OpenVINO .xml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    parser.add_argument(
        "--max-request-mb", type=float, default=32.0, help="largest request body accepted, in MiB (larger: 413)"
    )
    parser.add_argument(
        "--max-request-megapixels",
        type=float,
        default=100.0,
        help="the most pixels all images of one request may hold together, from their headers (more: 413)",
    )
    parser.add_argument("--workers", type=positive_int, default=1, help="processes, each with the model loaded")
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="images per forward pass: concurrent requests share one"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first queued image waits for others to share its forward pass",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=256,
        help="images waiting for the model at most; a request beyond gets 503 with Retry-After",
    )
    point = parser.add_mutually_exclusive_group()
    point.add_argument(
        "--fpr", type=float, help="decide at this false-positive rate, over the stored calibration scores"
    )
    point.add_argument("--threshold", type=float, help="decide at this aligned-score threshold")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    add_device_options(parser)


def run(args) -> int:
    import json
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from cada.predict import load_model
    from cada.serve import ENVIRONMENT, Limits, Service, create_app, server_config

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0-65535 (0: any free port), got {args.port}")
    if not 0 < args.max_request_mb <= 4096:
        raise ValueError(f"--max-request-mb must be in (0, 4096], got {args.max_request_mb}")
    if not 0 < args.max_request_megapixels <= 100_000:
        raise ValueError(f"--max-request-megapixels must be in (0, 100000], got {args.max_request_megapixels}")
    limits = Limits(
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_request_pixels=int(args.max_request_megapixels * 1_000_000),
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
    ).check()
    model = load_model(args.model, args.fpr, args.threshold, args.device, args.precision)  # bad input: one line now
    try:  # bound here: a port in use is one line, and port 0's choice is known
        listening = socket.create_server((args.host, args.port), backlog=2048)
    except OSError as error:  # the port is taken, the address is not this machine's, a port below 1024...
        raise ValueError(f"cannot listen on {args.host} port {args.port}: {error.strerror or error}") from None
    host, port = listening.getsockname()[:2]
    print(
        f"serving {printable(args.model)} on http://{host}:{port}/ (POST /predict, GET /health/ready, GET /metrics) "
        f"with {args.workers} worker(s); "
        + (
            "no threshold: scores only"
            if model.threshold is None
            else f"threshold {model.threshold:.4f}, {model.threshold_source}"
        ),
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("note: the server has no authentication; anyone who can reach this address can use it", file=sys.stderr)
    if args.workers == 1:
        server = uvicorn.Server(
            server_config(create_app(Service(model, str(args.model), limits)), host, port, args.quiet)
        )
        server.run(sockets=[listening])
    else:  # each worker process loads the model itself (uvicorn's supervisor restarts a worker that dies)
        from dataclasses import asdict

        os.environ[ENVIRONMENT] = json.dumps(
            {
                "model": str(args.model),
                "fpr": args.fpr,
                "threshold": args.threshold,
                "device": args.device,
                "precision": args.precision,
                "limits": asdict(limits),
                "threads": max(1, (os.cpu_count() or 1) // args.workers),
            }
        )
        os.environ["CADA_SERVE_WORKERS"] = str(args.workers)
        with tempfile.TemporaryDirectory(prefix="cada-metrics-") as metrics:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics  # every worker's metrics, summed at /metrics
            config = server_config("cada.serve:app_from_environment", host, port, args.quiet, workers=args.workers)
            Multiprocess(config, sockets=[listening]).run()
    print("stopped", flush=True)
    return 0
