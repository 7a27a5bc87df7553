"""`cada serve`: a run (or an exported model) behind an ASGI app (Starlette) on uvicorn.

    POST /predict            one image: the raw file bytes as the body (any Content-Type but multipart)
    POST /predict            several images: multipart/form-data, one file part per image (curl -F image=@a.png ...)
         ?overlay=1          add each image's heatmap overlay, a PNG at the image's own size
                             (long side at most 1024 px), base64 ("overlay_png")
    GET  /health, /health/live   liveness: {"status": "ok"} while the process answers
    GET  /health/ready       readiness: 200 {"status": "ready"} when the model is loaded and the queue has room,
                             else 503 (a load balancer sends the request elsewhere)
    GET  /info               the model, its settings, the threshold and how it was chosen, the limits, cada's version
    GET  /metrics            Prometheus metrics (see `Metrics`)
    GET  /                   a web page: drop images, see the decision and the overlay

The answer to /predict is {"threshold": T, "predictions": [...]}, one object per image in request order: name,
width, height, score, anomalous (null without a threshold), threshold, and for a run folder u and spread (the
predicted normal statistics: score = (base score - u) / spread, plus score_offset with knn-distance), with a knn
run nearest_distance and unfamiliar.

How a request flows, and what bounds it. The body needs a Content-Length of at most `max_request_bytes` (else 411
or 413, before it is read). Its images' headers are read first: each image at most `max_image_pixels` (a
decompression bomb is never decoded) and all of them together at most `max_request_pixels` (413). Images are decoded
and resized one at a time (decoded images are the large allocations), then queued for the model: one batcher runs
the forward passes, each taking the queued images up to `batch_size` that arrived within `max_wait_ms` of the first
(dynamic batching: concurrent requests share one pass). The queue holds at most `max_queue` images; a request that
does not fit is answered 503 with Retry-After at once, never dropped. Every error is JSON {"error": "one line",
"status": N}, malformed HTTP included. SIGTERM or Ctrl-C stops accepting connections and finishes the accepted requests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import collapse_rfc2231_value

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from cada import __version__
from cada.data.dataset import BadImageError, image_size_of, max_image_pixels, rgb_array
from cada.data.resize import crop_to_content, resize_rgb
from cada.predict import LoadedModel, full_size_outputs
from cada.serve_page import PAGE

OVERLAY_MAX_SIDE = 1024  # overlays of larger images are scaled down to this long side
# Images decoded at once. Decoded images are the large allocations: an image near the pixel limit takes about 1.3 GB
# while it is decoded, and with two decoding threads each kept its own (glibc) arena that large (measured: peak 3.6
# GB against 2.8 with one, under 50 such requests); one thread decodes faster than the model scores on 2 cores.
DECODERS = 1
BODY_BUDGET = 4  # request bodies of the largest size held at once; beyond: 503 before the body is read


@dataclass(frozen=True)
class Limits:
    """What one server accepts and holds (cada serve's options)."""

    max_request_bytes: int = 32 * 1024 * 1024
    max_images: int = 64  # per request
    max_request_pixels: int = 100_000_000  # over all images of a request, as their headers give them
    batch_size: int = 16  # images per forward pass
    max_wait_ms: float = 5.0  # how long the first queued image waits for others to share its pass
    max_queue: int = 256  # images queued for the model (about 10 s of work on 2 CPU cores); more: 503

    def check(self) -> Limits:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            if name != "max_wait_ms" and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if self.max_queue < self.batch_size:
            raise ValueError(f"the queue ({self.max_queue} images) must hold at least one batch ({self.batch_size})")
        return self


class RequestError(Exception):
    """A request the server refuses: the HTTP status, one line saying why, and any headers (Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(" ".join(message.split()))
        self.status, self.headers = status, headers or {}


# -- metrics ---------------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one app. Under `--workers N` (PROMETHEUS_MULTIPROC_DIR set by `cada serve`) every
    worker writes its values to that folder and /metrics sums them over the workers.

    cada_requests_total{endpoint, status}; cada_request_seconds{endpoint} (histogram); cada_batch_images (histogram
    of the images per forward pass); cada_queue_images (images waiting for the model); cada_images_total,
    cada_images_anomalous_total, cada_images_unfamiliar_total: their ratios are the share of images flagged, the
    signal that a line drifts (a calibrated 1% that becomes 2.4% on new normal images).
    """

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        own = {"registry": self.registry}
        self.requests = Counter("cada_requests", "HTTP requests answered", ["endpoint", "status"], **own)
        self.seconds = Histogram(
            "cada_request_seconds",
            "Time from a request's arrival to its answer",
            ["endpoint"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            **own,
        )
        self.batch = Histogram(
            "cada_batch_images", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), **own
        )
        self.queue = Gauge("cada_queue_images", "Images waiting for the model", multiprocess_mode="livesum", **own)
        self.images = Counter("cada_images", "Images scored", **own)
        self.anomalous = Counter("cada_images_anomalous", "Images scored at or above the threshold", **own)
        self.unfamiliar = Counter("cada_images_unfamiliar", "Images far from every training image", **own)

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


# -- the model behind a queue ----------------------------------------------------------------------------------


class Batcher:
    """The model behind a bounded queue: one task takes queued images in batches and runs each batch's forward
    pass in a thread of its own, so the event loop keeps answering while the model works."""

    def __init__(self, scorer: Callable[[torch.Tensor], tuple], limits: Limits, metrics: Metrics):
        self.scorer, self.limits, self.metrics = scorer, limits, metrics
        self.queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future]] = asyncio.Queue()
        self.waiting = 0  # images queued or in the pass being run
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="cada-model")
        self.task: asyncio.Task | None = None

    def has_room(self, images: int) -> bool:
        return self.waiting + images <= self.limits.max_queue

    def refuse_when_full(self, images: int) -> None:
        """RequestError(503, with Retry-After) when the queue cannot take `images` more."""
        if not self.has_room(images):
            raise RequestError(
                503,
                f"the server is busy ({self.waiting} images queued, room for {self.limits.max_queue}): try again "
                "in a second",
                {"Retry-After": "1"},
            )

    async def score(self, images: list[torch.Tensor]) -> list[tuple]:
        """Each image's (score, map, columns); RequestError(503) at once when the queue cannot take them."""
        self.refuse_when_full(len(images))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        self.waiting += len(images)
        self.metrics.queue.inc(len(images))
        for image, future in zip(images, futures):
            self.queue.put_nowait((image, future))
        return list(await asyncio.gather(*futures))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while len(batch) < self.limits.batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(image, future) for image, future in batch if not future.done()]  # a cancelled request's go
            try:
                if live:
                    self.metrics.batch.observe(len(live))
                    stacked = torch.stack([image for image, _ in live])
                    outputs = await loop.run_in_executor(self.model_thread, self._forward, stacked)
                    for position, (_, future) in enumerate(live):
                        if not future.done():
                            future.set_result(tuple(part[position] for part in outputs))
            except Exception as error:  # a bug: every request of the batch gets a 500 naming it
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
            finally:
                self.waiting -= len(batch)
                self.metrics.queue.dec(len(batch))

    def _forward(self, images: torch.Tensor) -> tuple:
        with torch.inference_mode():
            scores, maps, *extra = self.scorer(images)
        columns = extra[0] if extra else {}
        rows = [{key: values[i].item() for key, values in columns.items()} for i in range(len(images))]
        return scores.tolist(), list(maps), rows

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.model_thread.shutdown(wait=True)


# -- requests --------------------------------------------------------------------------------------------------


def multipart_images(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """The file parts of a multipart/form-data body, as (file name or field name, bytes)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise RequestError(400, "the multipart/form-data body could not be parsed (is the boundary right?)")
    images = []
    for number, part in enumerate(message.iter_parts(), 1):
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            raise RequestError(400, f"part {number} of the multipart body holds no file")
        field = part.get_param("name", header="content-disposition")
        name = part.get_filename() or (collapse_rfc2231_value(field) if field else None) or f"image {number}"
        images.append((str(name), data))
    return images


def _small(rgb: np.ndarray) -> np.ndarray:
    """The image for its overlay: its own size, or scaled down to OVERLAY_MAX_SIDE on its long side."""
    height, width = rgb.shape[:2]
    scale = OVERLAY_MAX_SIDE / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _overlay_png(rgb: np.ndarray, aligned_map: torch.Tensor) -> str:
    """The heatmap over the image at the image's size (the map upsampled bilinearly), base64 PNG."""
    picture, _ = full_size_outputs(aligned_map, rgb.shape[0], rgb.shape[1], rgb)
    assert picture is not None  # an image was given
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Service:
    """The loaded model, its limits and metrics, and the routes' work."""

    def __init__(self, model: LoadedModel, source: str, limits: Limits):
        self.model, self.source, self.limits = model, source, limits.check()
        self.metrics = Metrics()
        self.batcher = Batcher(model.scorer, self.limits, self.metrics)
        self.decoders = ThreadPoolExecutor(DECODERS, thread_name_prefix="cada-decode")
        self.body_bytes = 0  # of the request bodies held now: at most BODY_BUDGET x max_request_bytes
        self.ready = False

    def info(self) -> dict:
        model = self.model
        return {
            "cada_version": __version__,
            "model": self.source,
            "image_size": model.image_size,
            "resize": model.resize,
            "threshold": model.threshold,
            "threshold_source": model.threshold_source,
            "decision": "anomalous when score >= threshold",
            "calibration": model.calibration,
            "settings": model.settings,
            "unfamiliar_reference_distance": model.description.get("unfamiliar_reference_distance"),
            **asdict(self.limits),
            "max_image_pixels": max_image_pixels(),
            "workers": int(os.environ.get("CADA_SERVE_WORKERS", "1")),
        }

    def _checked_sizes(self, images: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
        """Each image's (width, height) from its header; RequestError when an image or the request is too big."""
        if not images:
            raise RequestError(400, "no image in the request")
        if len(images) > self.limits.max_images:
            raise RequestError(413, f"{len(images)} images in one request; at most {self.limits.max_images}")
        sizes = []
        for name, data in images:
            try:
                sizes.append(image_size_of(io.BytesIO(data), name))
            except BadImageError as error:
                raise RequestError(400, str(error)) from None
        pixels = sum(width * height for width, height in sizes)
        if pixels > self.limits.max_request_pixels:
            raise RequestError(
                413,
                f"the request's {len(images)} images hold {pixels:,} pixels, over this server's budget of "
                f"{self.limits.max_request_pixels:,} per request (cada serve --max-request-megapixels); send "
                "fewer or smaller images per request",
            )
        return sizes

    def _decode(self, name: str, data: bytes, overlays: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        """(the model's input, the overlay's background or None); run by `decoders`, one image at a time."""
        try:
            rgb = rgb_array(io.BytesIO(data), name)
        except BadImageError as error:
            raise RequestError(400, str(error)) from None
        return resize_rgb(rgb, self.model.image_size, self.model.resize), (_small(rgb) if overlays else None)

    async def predict(self, images: list[tuple[str, bytes]], overlays: bool) -> dict:
        sizes = self._checked_sizes(images)
        self.batcher.refuse_when_full(len(images))  # before any decoding
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self.decoders, self._decode, name, data, overlays) for name, data in images)
        )
        results = await self.batcher.score([inputs for inputs, _ in decoded])
        threshold = self.model.threshold
        predictions = []
        for (name, _), (width, height), (_, picture), (score, aligned_map, columns) in zip(
            images, sizes, decoded, results
        ):
            row = {
                "name": name,
                "width": int(width),
                "height": int(height),
                "score": score,
                "anomalous": None if threshold is None else score >= threshold,
                "threshold": threshold,
                **columns,
            }
            if picture is not None:
                cropped = crop_to_content(aligned_map, width, height, self.model.resize)
                row["overlay_png"] = await loop.run_in_executor(self.decoders, _overlay_png, picture, cropped)
            predictions.append(row)
        self.metrics.images.inc(len(predictions))
        self.metrics.anomalous.inc(sum(bool(row["anomalous"]) for row in predictions))
        self.metrics.unfamiliar.inc(sum(bool(row.get("unfamiliar")) for row in predictions))
        return {"threshold": threshold, "threshold_source": self.model.threshold_source, "predictions": predictions}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": message, "status": status}, status, headers={"Cache-Control": "no-store", **(headers or {})}
    )


def _answer(data: dict, status: int = 200) -> Response:
    body = json.dumps(data, allow_nan=False).encode("utf-8")
    return Response(body, status, media_type="application/json", headers={"Cache-Control": "no-store"})


def create_app(service: Service) -> Starlette:
    """The ASGI app serving `service` (its batcher runs while the app's lifespan does)."""

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    async def live(request: Request) -> Response:
        return _answer({"status": "ok"})

    async def ready(request: Request) -> Response:
        if not service.ready:
            return _error(503, "the model is not loaded yet")
        if not service.batcher.has_room(1):
            return _error(503, "the queue is full", {"Retry-After": "1"})
        return _answer({"status": "ready", "queued_images": service.batcher.waiting})

    async def info(request: Request) -> Response:
        return _answer(service.info())

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        try:
            answer = _answer(await service.predict(await _images_of(request), _wants_overlays(request)))
        except RequestError as error:
            answer = _error(error.status, str(error), error.headers)
            if error.status in (411, 413, 503):
                answer.headers["Connection"] = "close"  # the body may be unread: the connection cannot go on
        except ClientDisconnect:  # the client went away: nobody to answer, nothing to log
            answer = Response(status_code=499)
        service.metrics.seconds.labels("predict").observe(time.perf_counter() - started)
        return answer

    async def _images_of(request: Request) -> list[tuple[str, bytes]]:
        if request.headers.get("transfer-encoding"):
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        text = request.headers.get("content-length")
        if text is None or not text.isdigit():
            raise RequestError(411 if text is None else 400, "the request needs a valid Content-Length header")
        length, limit = int(text), service.limits.max_request_bytes
        if length > limit:
            raise RequestError(
                413,
                f"the request body is {length:,} bytes, over this server's limit of {limit:,} "
                "(cada serve --max-request-mb); send fewer or smaller images per request",
            )
        service.batcher.refuse_when_full(1)
        if service.body_bytes + length > BODY_BUDGET * limit:
            raise RequestError(
                503, "the server holds as many request bodies as it may: try again in a second", {"Retry-After": "1"}
            )
        service.body_bytes += length
        try:
            body = await request.body()
        finally:
            service.body_bytes -= length
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body):,} of {length:,} bytes")
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/"):
            return multipart_images(body, content_type)
        return [(request.headers.get("x-image-name") or "image", body)]

    def _wants_overlays(request: Request) -> bool:
        return request.query_params.get("overlay", "0").lower() in ("1", "true", "yes")

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if error.status_code == 404:
            message = f"no such endpoint {request.url.path}: try GET /, /health, /info, /metrics or POST /predict"
        elif error.status_code == 405:
            message = f"{request.url.path} does not answer {request.method}"
        else:
            message = str(error.detail)
        return _error(error.status_code, message, dict(error.headers or {}))

    async def server_error(request: Request, error: Exception) -> Response:  # a bug (uvicorn logs its traceback)
        return _error(500, f"prediction failed: {type(error).__name__}: {error}")

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", live, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        service.ready = True
        try:
            yield
        finally:
            service.ready = False
            await service.batcher.stop()
            service.decoders.shutdown(wait=True)

    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(CountRequests, metrics=service.metrics, endpoints={route.path for route in routes})],
        lifespan=lifespan,
    )


class CountRequests:
    """ASGI middleware: every answer counted by endpoint and status (cada_requests_total)."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()


class JSONErrorsH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse (malformed, headers over the size limit)
    with a JSON error like every other, instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        import h11

        body = json.dumps({"error": f"{msg} (malformed, or its headers are over the size limit)", "status": 400})
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body.encode("utf-8")),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# -- running it ----------------------------------------------------------------------------------------------------

ENVIRONMENT = "CADA_SERVE"  # what each `--workers` process loads: the model and the options, as JSON


def app_from_environment() -> Starlette:
    """uvicorn's app factory in each worker process of `cada serve --workers N`: the model and options that
    `cada serve` put in $CADA_SERVE, loaded in this process."""
    from cada.predict import load_model

    options = json.loads(os.environ[ENVIRONMENT])
    model = load_model(options["model"], options["fpr"], options["threshold"], options["device"], options["precision"])
    torch.set_num_threads(options["threads"])  # the machine's cores shared out over the workers
    return create_app(Service(model, options["model"], Limits(**options["limits"])))


def server_config(app, host: str, port: int, quiet: bool, workers: int = 1, **options):
    """uvicorn's Config for `app` (an app, or the factory's import string with `workers` > 1)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=workers,
        factory=isinstance(app, str),
        http=JSONErrorsH11Protocol,
        lifespan="on",
        access_log=not quiet,
        log_level="warning" if quiet else "info",
        timeout_graceful_shutdown=60,  # accepted requests finish (the queue holds a few seconds of work)
        **options,
    )


class BackgroundServer:
    """`model` served on a loopback port from a thread of this process (tests, benchmarks, notebooks): its `url`,
    its `service` (metrics, queue) and `stop()`, which finishes accepted requests as SIGTERM does."""

    def __init__(self, model: LoadedModel, source: str = "model", host: str = "127.0.0.1", port: int = 0, **limits):
        import socket

        import uvicorn

        self.service = Service(model, source, Limits(**limits))
        listening = socket.create_server((host, port))
        self.url = f"http://{host}:{listening.getsockname()[1]}"
        self.server = uvicorn.Server(server_config(create_app(self.service), host, port, quiet=True))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listening]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
