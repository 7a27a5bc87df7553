"""`cada serve`: a run (or an exported .onnx model) behind a small HTTP API and a web page, standard library only.

    POST /predict            one image: the raw file bytes as the body (any Content-Type but multipart)
    POST /predict            several images: multipart/form-data, one file part per image (curl -F image=@a.png ...)
         ?overlay=1          add each image's heatmap overlay, a PNG at the image's own size
                             (long side at most 1024 px), base64 ("overlay_png")
    GET  /health             {"status": "ok"}
    GET  /info               the model, its settings, the threshold and how it was chosen, cada's version
    GET  /                   a web page: drop images, see the decision and the overlay

The answer to /predict is {"threshold": T, "predictions": [...]}, one object per image in request order: name,
width, height, score, anomalous (null without a threshold), threshold, and for a run folder u and spread (the
predicted normal statistics: score = (base score - u) / spread, plus score_offset with knn-distance), with a knn
run nearest_distance and unfamiliar.

Errors are JSON {"error": "one line"}: 400 for an image that cannot be decoded (or is over the pixel limit: a
decompression bomb) or a malformed request, 404, 405, 411 without Content-Length, 413 for a body over the size
limit. The model is loaded once; requests are served by threads, one inference at a time (a lock), and at most
two images are decoded at once, so memory stays bounded.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import collapse_rfc2231_value
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
from PIL import Image

from cada import __version__
from cada.data.dataset import BadImageError, max_image_pixels, rgb_array
from cada.data.resize import crop_to_content, resize_rgb
from cada.predict import LoadedModel, full_size_outputs
from cada.serve_page import PAGE

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # the default body limit (--max-request-mb)
MAX_IMAGES = 64  # images in one request
MAX_BODIES = 4  # request bodies read and held at once
OVERLAY_MAX_SIDE = 1024  # overlays of larger images are scaled down to this long side


class RequestError(ValueError):
    """A request the server refuses: the HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Service:
    """The loaded model and what answers need of it; safe to call from several threads."""

    def __init__(self, model: LoadedModel, source: str, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.model, self.source, self.max_request_bytes = model, source, max_request_bytes
        self._inference = threading.Lock()
        self._decoding = threading.BoundedSemaphore(2)  # decoded images are the big allocations: two at a time
        # Request bodies held at once (each up to max_request_bytes): more wait their turn, memory stays bounded.
        self.bodies = threading.BoundedSemaphore(MAX_BODIES)

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
            "max_request_bytes": self.max_request_bytes,
            "max_images_per_request": MAX_IMAGES,
            "max_image_pixels": max_image_pixels(),
        }

    def predict(self, images: list[tuple[str, bytes]], overlays: bool = False) -> dict:
        """[(name, file bytes)] -> the /predict answer; RequestError(400) naming the first image that is not one."""
        if not images:
            raise RequestError(400, "no image in the request")
        if len(images) > MAX_IMAGES:
            raise RequestError(413, f"{len(images)} images in one request; at most {MAX_IMAGES}")
        size = self.model.image_size
        pictures: list[np.ndarray | None] = []  # the overlays' backgrounds, when asked for
        inputs, sizes = [], []
        for name, data in images:
            with self._decoding:
                try:
                    rgb = rgb_array(io.BytesIO(data), name)
                except BadImageError as error:
                    raise RequestError(400, str(error)) from None
                inputs.append(resize_rgb(rgb, size, self.model.resize))
                pictures.append(_small(rgb) if overlays else None)
                sizes.append(rgb.shape[:2])
                del rgb  # only the model's input (and a bounded overlay picture) is kept
        with self._inference, torch.inference_mode():
            scores, maps, *extra = self.model.scorer(torch.stack(inputs))
        columns = extra[0] if extra else {}
        threshold = self.model.threshold
        predictions = []
        for i, (name, _) in enumerate(images):
            score = float(scores[i])
            row = {
                "name": name,
                "width": int(sizes[i][1]),
                "height": int(sizes[i][0]),
                "score": score,
                "anomalous": None if threshold is None else score >= threshold,
                "threshold": threshold,
                **{key: values[i].item() for key, values in columns.items()},
            }
            picture = pictures[i]
            if picture is not None:
                height, width = sizes[i]
                aligned_map = crop_to_content(maps[i], width, height, self.model.resize)
                row["overlay_png"] = base64.b64encode(_overlay_png(picture, aligned_map)).decode("ascii")
            predictions.append(row)
        return {"threshold": threshold, "threshold_source": self.model.threshold_source, "predictions": predictions}


def _small(rgb: np.ndarray) -> np.ndarray:
    """The image for its overlay: its own size, or scaled down to OVERLAY_MAX_SIDE on its long side."""
    height, width = rgb.shape[:2]
    scale = OVERLAY_MAX_SIDE / max(height, width)
    if scale >= 1:
        return rgb
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _overlay_png(rgb: np.ndarray, aligned_map: torch.Tensor) -> bytes:
    """The heatmap over the image at the image's size: the map upsampled bilinearly (as evaluate's
    --pixel-resolution original), PNG bytes."""
    picture, _ = full_size_outputs(aligned_map, rgb.shape[0], rgb.shape[1], rgb)
    assert picture is not None  # an image was given
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart_images(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """The file parts of a multipart/form-data body, as (file name or field name, bytes)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise RequestError(400, "the multipart/form-data body could not be parsed (is the boundary right?)")
    images = []
    for number, part in enumerate(message.iter_parts(), 1):
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            raise RequestError(400, f"part {number} of the multipart body holds no file")
        field = part.get_param("name", header="content-disposition")
        images.append((part.get_filename() or (collapse_rfc2231_value(field) if field else f"image {number}"), data))
    return images


class Handler(BaseHTTPRequestHandler):
    """Routes and errors; the Service does the work."""

    service: Service  # set on the subclass make_server builds
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections; every answer has a length
    server_version = f"cada/{__version__}"
    timeout = 60  # a client that stops sending mid-request frees its thread after this many seconds

    # -- answers ------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data, allow_nan=False).encode("utf-8"), "application/json", headers)

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        self._json(status, {"error": message, "status": status}, headers)

    def log_message(self, format: str, *args) -> None:  # one line per request, as http.server does, unless quiet
        if not getattr(self.server, "quiet", False):
            super().log_message(format, *args)

    # -- routes -------------------------------------------------------------------------------------------------
    ROUTES = {"/": ("GET",), "/health": ("GET",), "/info": ("GET",), "/predict": ("POST",)}

    def _route(self) -> str | None:
        """The path if this method is allowed on it; else the 404 or 405 is sent and None returned."""
        path = urlsplit(self.path).path
        if path not in self.ROUTES:
            self._error(404, f"no such endpoint {path}: try GET /, GET /health, GET /info or POST /predict")
            return None
        allowed = self.ROUTES[path]
        if self.command not in allowed and not (self.command == "HEAD" and "GET" in allowed):
            self._error(
                405, f"{path} answers {' and '.join(allowed)}, not {self.command}", {"Allow": ", ".join(allowed)}
            )
            return None
        return path

    def do_GET(self) -> None:
        path = self._route()
        if path == "/":
            self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/info":
            self._json(200, self.service.info())

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        if self.headers.get("Content-Length"):
            self.close_connection = True  # the body is not read: this connection cannot carry another request
        self._route()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def handle_expect_100(self) -> bool:
        """A client that asks first (curl does for large bodies) is told 413 before it sends an oversized body."""
        length = self._length()
        if length is not None and length > self.service.max_request_bytes:
            self._too_large(length)
            return False
        return super().handle_expect_100()

    def _length(self) -> int | None:
        text = self.headers.get("Content-Length")
        try:
            return None if text is None else int(text)
        except ValueError:
            return -1

    def _too_large(self, length: int) -> None:
        self.close_connection = True
        limit = self.service.max_request_bytes
        self._error(
            413,
            f"the request body is {length:,} bytes, over this server's limit of {limit:,} "
            "(cada serve --max-request-mb); send fewer or smaller images per request",
        )

    def do_POST(self) -> None:
        if self._route() is None:
            if self.headers.get("Content-Length"):
                self.close_connection = True
            return
        length = self._length()
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return self._error(411, "send the body with a Content-Length, not chunked")
        if length is None or length < 0:
            self.close_connection = True
            return self._error(411 if length is None else 400, "the request needs a valid Content-Length header")
        if length > self.service.max_request_bytes:
            # Read (and drop) a body up to twice the limit so the client sees the answer, not a reset connection.
            if length <= 2 * self.service.max_request_bytes:
                self._discard(length)
            return self._too_large(length)
        with self.service.bodies:
            self._predict(length)

    def _predict(self, length: int) -> None:
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return self._error(400, f"the body ended after {len(body):,} of {length:,} bytes")
        query = parse_qs(urlsplit(self.path).query)
        overlays = query.get("overlay", ["0"])[-1].lower() in ("1", "true", "yes")
        content_type = self.headers.get("Content-Type", "")
        try:
            if content_type.lower().startswith("multipart/"):
                images = _multipart_images(body, content_type)
            else:
                images = [(self.headers.get("X-Image-Name") or "image", body)]
            answer = self.service.predict(images, overlays)
        except RequestError as error:
            return self._error(error.status, " ".join(str(error).split()))
        except Exception as error:  # a bug, not the client's fault: logged in full, answered in one line
            self.log_error("prediction failed: %r", error)
            import traceback

            traceback.print_exc()
            return self._error(500, f"prediction failed: {type(error).__name__}: {error}")
        self._json(200, answer)

    def _discard(self, length: int) -> None:
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    quiet = False  # True: no line per request on stderr


def make_server(
    model: LoadedModel,
    source: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    quiet: bool = False,
) -> Server:
    """The server, bound and ready for serve_forever(); port 0 picks a free port (server.server_address)."""
    handler = type("CadaHandler", (Handler,), {"service": Service(model, source, max_request_bytes)})
    server = Server((host, port), handler)
    server.quiet = quiet
    return server
