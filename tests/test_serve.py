"""`cada serve`: the ASGI app on uvicorn, started on a loopback port in a thread and called with urllib."""

import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from cada.cli import main
from cada.predict import load_model
from cada.serve import BackgroundServer


def start(model, source="run", **limits) -> BackgroundServer:
    return BackgroundServer(model, source, **limits)


@pytest.fixture(scope="module")
def running(calibrated_run):
    server = start(load_model(calibrated_run), str(calibrated_run))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(running):
    return running.url


def call(url, data=None, headers=None, method=None):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def multipart(files):
    boundary = uuid.uuid4().hex
    body = b""
    for name, data in files:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return body + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png(path=None, size=None, colour=(120, 60, 30)):
    image = Image.open(path).convert("RGB") if path else Image.new("RGB", size, colour)
    if path and size:
        image = image.resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_and_info(server, calibrated_run):
    for path in ("/health", "/health/live"):
        status, _, body = call(server + path)
        assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = call(server + "/health/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, _, body = call(server + "/info")
    info = json.loads(body)
    config = json.loads((calibrated_run / "config.json").read_text())
    assert status == 200 and info["threshold"] == config["calibration"]["threshold"]
    assert info["threshold_source"].startswith("stored in the run: at false-positive rate 0.1")
    assert info["settings"] == config["settings"] and info["image_size"] == 64 and info["cada_version"]
    assert "normal_scores" not in info["calibration"] and info["calibration"]["n_normal"] == 24
    assert info["batch_size"] == 16 and info["max_queue"] == 256 and info["max_request_pixels"] == 100_000_000


def test_one_image_scores_as_cada_predict_does(server, calibrated_run, tiny_data, tmp_path):
    path = sorted((tiny_data / "washer" / "test").rglob("*.png"))[-1]
    status, headers, body = call(
        server + "/predict", path.read_bytes(), {"Content-Type": "image/png", "X-Image-Name": "part 7"}
    )
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    (prediction,) = answer["predictions"]
    assert main(["predict", str(calibrated_run), str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    (expected,) = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    assert prediction["name"] == "part 7" and prediction["threshold"] == answer["threshold"]
    for key in ("score", "u", "spread"):
        assert prediction[key] == pytest.approx(expected[key], abs=1e-5)
    assert prediction["anomalous"] == expected["anomalous"] == (prediction["score"] >= answer["threshold"])
    assert {"nearest_distance", "unfamiliar"} <= set(prediction) or "nearest_distance" not in expected
    assert "overlay_png" not in prediction and (prediction["width"], prediction["height"]) == (64, 64)


def test_a_batch_with_overlays_at_each_images_own_size(server, tiny_data):
    path = sorted((tiny_data / "marble" / "test").rglob("*.png"))[0]
    body, headers = multipart(
        [("a.png", png(path, (96, 48))), ("b.png", png(size=(40, 70))), ("c.png", path.read_bytes())]
    )
    status, _, answer = call(server + "/predict?overlay=1", body, headers)
    assert status == 200
    predictions = json.loads(answer)["predictions"]
    assert [p["name"] for p in predictions] == ["a.png", "b.png", "c.png"]
    for prediction, size in zip(predictions, [(96, 48), (40, 70), (64, 64)]):
        assert (prediction["width"], prediction["height"]) == size
        overlay = Image.open(io.BytesIO(base64.b64decode(prediction["overlay_png"])))
        assert overlay.format == "PNG" and overlay.size == size
    # The same image alone or in a batch: the same score.
    status, _, alone = call(server + "/predict", path.read_bytes())
    assert json.loads(alone)["predictions"][0]["score"] == pytest.approx(predictions[2]["score"], abs=1e-5)


def test_bad_images_and_requests_get_one_line_4xx(server, calibrated_run, monkeypatch):
    status, _, body = call(server + "/predict", b"not an image", {"X-Image-Name": "broken.png"})
    error = json.loads(body)["error"]
    assert status == 400 and error.startswith("cannot read image broken.png") and "\n" not in error
    assert "BytesIO" not in error  # PIL names an upload by its repr: the message names the file instead
    body, headers = multipart([("good.png", png(size=(64, 64))), ("bad.png", b"\x89PNG truncated")])
    status, _, answer = call(server + "/predict", body, headers)
    assert status == 400 and "bad.png" in json.loads(answer)["error"]
    status, _, answer = call(server + "/predict", b"--x\r\n", {"Content-Type": "multipart/form-data"})
    assert status == 400 and "multipart" in json.loads(answer)["error"]
    status, _, answer = call(server + "/predict", b"", {})
    assert status == 400 and json.loads(answer)["error"].startswith("cannot read image")
    # A decompression bomb: a small file whose header claims more pixels than the limit is never decoded.
    monkeypatch.setenv("CADA_MAX_IMAGE_PIXELS", "1000")
    status, _, answer = call(server + "/predict", png(size=(64, 64)))
    assert status == 400 and "decompression bomb" in json.loads(answer)["error"]


def test_oversized_requests_get_413(calibrated_run):
    running = start(load_model(calibrated_run), max_request_bytes=1000, max_request_pixels=6000)
    url = running.url
    try:
        status, _, body = call(url + "/predict", png(size=(200, 200), colour=None) + b"\0" * 2000)
        assert status == 413 and "over this server's limit of 1,000" in json.loads(body)["error"]
        status, _, body = call(url + "/predict", b"\0" * 100_000)  # far over: not even read
        assert status == 413
        assert call(url + "/health")[0] == 200  # the server is still there
        # A client that asks first (Expect: 100-continue, as curl does) is refused before it sends the body.
        connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        connection.putrequest("POST", "/predict")
        connection.putheader("Content-Length", str(1 << 30))
        connection.putheader("Expect", "100-continue")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "1,073,741,824 bytes" in json.loads(response.read())["error"]
        connection.close()
        # The pixel budget is per request: two 50 x 50 images pass alone, not together (their headers are read,
        # nothing is decoded).
        small = png(size=(50, 50))
        assert call(url + "/predict", small)[0] == 200
        body, headers = multipart([("a.png", small), ("b.png", small), ("c.png", small)])
        status, _, answer = call(url + "/predict", body, headers)
        assert status == 413 and "hold 7,500 pixels, over this server's budget of 6,000" in json.loads(answer)["error"]
    finally:
        running.stop()


def test_a_body_without_a_length_is_refused(server):
    port = int(server.rsplit(":", 1)[1])
    for headers in ({}, {"Transfer-Encoding": "chunked"}):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.putrequest("POST", "/predict")
        for key, value in headers.items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
        connection.close()


def test_unknown_paths_and_methods(server):
    status, _, body = call(server + "/nope")
    assert status == 404 and "/nope" in json.loads(body)["error"]
    status, headers, body = call(server + "/predict")
    assert status == 405 and headers["Allow"] == "POST" and "does not answer GET" in json.loads(body)["error"]
    status, headers, _ = call(server + "/health", b"x")
    assert status == 405 and set(headers["Allow"].split(", ")) == {"GET", "HEAD"}
    assert call(server + "/info", method="DELETE")[0] == 405
    # A request uvicorn cannot parse gets a JSON answer too (it was HTML, as 414 and 431 were).
    port = int(server.rsplit(":", 1)[1])
    for request in (
        b"GET / HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, head
        assert "Invalid HTTP request" in json.loads(body)["error"]


def test_the_page_is_self_contained(server):
    status, headers, body = call(server + "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "predict?overlay=1" in page and "FormData" in page and "info" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_concurrent_requests_get_their_own_answers(server, tiny_data):  # batched together, answered apart
    paths = sorted((tiny_data / "circuit" / "test").rglob("*.png"))[:4]
    alone = [json.loads(call(server + "/predict", p.read_bytes())[2])["predictions"][0]["score"] for p in paths]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: call(server + "/predict", p.read_bytes()), paths * 3))
    assert all(status == 200 for status, _, _ in answers)
    scores = [json.loads(body)["predictions"][0]["score"] for _, _, body in answers]
    assert np.allclose(scores, alone * 3, atol=1e-5) and len(set(np.round(alone, 6))) > 1


def test_operating_point_and_exported_model(calibrated_run, tiny_data, tmp_path):
    assert main(["export", str(calibrated_run), "--out", str(tmp_path / "model.onnx")]) == 0
    path = sorted((tiny_data / "washer" / "test").rglob("*.png"))[0]
    running = start(load_model(tmp_path / "model.onnx", threshold=-1e6), "model.onnx")
    try:
        info = json.loads(call(running.url + "/info")[2])
        assert info["threshold"] == -1e6 and info["threshold_source"] == "given with --threshold"
        (prediction,) = json.loads(call(running.url + "/predict", path.read_bytes())[2])["predictions"]
        assert prediction["anomalous"] is True and {"u", "spread"} <= prediction.keys()  # graph outputs too
    finally:
        running.stop()


def test_serve_cli_refuses_bad_input_in_one_line(calibrated_run, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["serve", str(calibrated_run), "--max-request-mb", "0"]) == 2
    assert "--max-request-mb" in capsys.readouterr().err
    assert main(["serve", str(calibrated_run), "--max-queue", "4", "--batch-size", "8"]) == 2
    assert "must hold at least one batch" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as busy:
        assert main(["serve", str(calibrated_run), "--port", str(busy.getsockname()[1])]) == 2
        error = capsys.readouterr().err
        assert "cannot listen on 127.0.0.1 port" in error and "in use" in error


# -- the queue, batching, metrics and shutdown ------------------------------------------------------------------


class SlowModel:
    """A loaded model whose forward passes wait for `release` (or `seconds`) and are counted with their sizes."""

    def __init__(self, model, seconds: float = 0.0):
        self.model, self.seconds, self.batches = model, seconds, []
        self.release = threading.Event()
        self.release.set()  # a test that holds the passes back clears it
        inner = model.scorer

        def scorer(images):
            self.batches.append(len(images))
            self.release.wait(60)
            time.sleep(self.seconds)
            return inner(images)

        model.scorer = scorer


def test_concurrent_requests_share_forward_passes(calibrated_run, tiny_data):
    slow = SlowModel(load_model(calibrated_run))
    slow.release.clear()  # the first pass waits: the requests behind it queue up and go together
    running = start(slow.model, batch_size=8, max_queue=32, max_wait_ms=50)
    try:
        paths = sorted((tiny_data / "weave" / "test").rglob("*.png"))[:6]
        with ThreadPoolExecutor(7) as pool:
            first = pool.submit(call, running.url + "/predict", paths[0].read_bytes())
            time.sleep(0.5)
            rest = [pool.submit(call, running.url + "/predict", p.read_bytes()) for p in paths[1:]]
            time.sleep(0.5)
            slow.release.set()
            answers = [first.result()] + [future.result() for future in rest]
        assert all(status == 200 for status, _, _ in answers)
        assert slow.batches == [1, 5]  # five requests, one forward pass
        metrics = call(running.url + "/metrics")[2].decode()
        assert "cada_batch_images_count 2.0" in metrics and "cada_batch_images_sum 6.0" in metrics
        assert (
            "cada_images_total 6.0" in metrics
            and 'cada_requests_total{endpoint="/predict",status="200"} 6.0' in metrics
        )
    finally:
        running.stop()


def test_a_full_queue_answers_503_with_retry_after_and_recovers(calibrated_run, tiny_data):
    slow = SlowModel(load_model(calibrated_run))
    slow.release.clear()
    running = start(slow.model, batch_size=2, max_queue=2)
    try:
        image = sorted((tiny_data / "weave" / "test").rglob("*.png"))[0].read_bytes()
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(call, running.url + "/predict", image) for _ in range(2)]
            time.sleep(1)
            status, headers, body = call(running.url + "/predict", image)
            assert status == 503 and headers["Retry-After"] == "1" and "busy" in json.loads(body)["error"]
            assert call(running.url + "/health/ready")[0] == 503 and call(running.url + "/health/live")[0] == 200
            slow.release.set()
            assert [future.result()[0] for future in held] == [200, 200]
        assert call(running.url + "/predict", image)[0] == 200 and call(running.url + "/health/ready")[0] == 200
    finally:
        running.stop()


def test_shutdown_finishes_accepted_requests(calibrated_run, tiny_data):
    slow = SlowModel(load_model(calibrated_run), seconds=1.0)
    running = start(slow.model)
    image = sorted((tiny_data / "weave" / "test").rglob("*.png"))[0].read_bytes()
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(call, running.url + "/predict", image)
        time.sleep(0.5)  # in the forward pass
        running.stop()
        status, _, body = accepted.result()
    assert status == 200 and len(json.loads(body)["predictions"]) == 1


def test_a_client_that_goes_away_leaves_no_traceback(running, capfd):
    port = int(running.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 100)
    time.sleep(0.5)
    assert call(running.url + "/health")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_workers_serve_together_and_sum_their_metrics(calibrated_run, tiny_data):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "cada",
        "serve",
        str(calibrated_run),
        "--port",
        str(port),
        "--workers",
        "2",
        "--quiet",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if call(url + "/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        image = sorted((tiny_data / "weave" / "test").rglob("*.png"))[0].read_bytes()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: call(url + "/predict", image), range(16)))
        assert [status for status, _, _ in answers] == [200] * 16
        assert json.loads(call(url + "/info")[2])["workers"] == 2
        assert "cada_images_total 16.0" in call(url + "/metrics")[2].decode()  # summed over both workers
    finally:
        process.terminate()
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "stopped" in out and "Traceback" not in err
