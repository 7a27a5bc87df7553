"""`cada serve`: the HTTP API and the page, started on loopback port 0 in a thread and called with urllib."""

import base64
import http.client
import io
import json
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from cada.cli import main
from cada.predict import load_model
from cada.serve import make_server


def start(model, source="run", **options):
    server = make_server(model, source, "127.0.0.1", 0, quiet=True, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def server(calibrated_run):
    server, url = start(load_model(calibrated_run), str(calibrated_run))
    yield url
    server.shutdown()
    server.server_close()


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
    status, _, body = call(server + "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = call(server + "/info")
    info = json.loads(body)
    config = json.loads((calibrated_run / "config.json").read_text())
    assert status == 200 and info["threshold"] == config["calibration"]["threshold"]
    assert info["threshold_source"].startswith("stored in the run: at false-positive rate 0.1")
    assert info["settings"] == config["settings"] and info["image_size"] == 64 and info["cada_version"]
    assert "normal_scores" not in info["calibration"] and info["calibration"]["n_normal"] == 24


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
    server, url = start(load_model(calibrated_run), max_request_bytes=1000)
    try:
        status, _, body = call(url + "/predict", png(size=(200, 200), colour=None) + b"\0" * 2000)
        assert status == 413 and "over this server's limit of 1,000" in json.loads(body)["error"]
        status, _, body = call(url + "/predict", b"\0" * 100_000)  # far over: not even read
        assert status == 413
        assert call(url + "/health")[0] == 200  # the server is still there
        # A client that asks first (Expect: 100-continue, as curl does) is refused before it sends the body.
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        connection.putrequest("POST", "/predict")
        connection.putheader("Content-Length", str(1 << 30))
        connection.putheader("Expect", "100-continue")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "1,073,741,824 bytes" in json.loads(response.read())["error"]
        connection.close()
    finally:
        server.shutdown()
        server.server_close()


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
    assert status == 405 and headers["Allow"] == "POST" and "not GET" in json.loads(body)["error"]
    status, headers, _ = call(server + "/health", b"x")
    assert status == 405 and headers["Allow"] == "GET"
    assert call(server + "/info", method="DELETE")[0] == 405


def test_the_page_is_self_contained(server):
    status, headers, body = call(server + "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "predict?overlay=1" in page and "FormData" in page and "info" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_concurrent_requests_get_their_own_answers(server, tiny_data):
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
    server, url = start(load_model(tmp_path / "model.onnx", threshold=-1e6), "model.onnx")
    try:
        info = json.loads(call(url + "/info")[2])
        assert info["threshold"] == -1e6 and info["threshold_source"] == "given with --threshold"
        (prediction,) = json.loads(call(url + "/predict", path.read_bytes())[2])["predictions"]
        assert prediction["anomalous"] is True and {"u", "spread"} <= prediction.keys()  # graph outputs too
    finally:
        server.shutdown()
        server.server_close()


def test_serve_cli_refuses_bad_input_in_one_line(calibrated_run, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["serve", str(calibrated_run), "--max-request-mb", "0"]) == 2
    assert "--max-request-mb" in capsys.readouterr().err
    busy = make_server(load_model(calibrated_run), "run", "127.0.0.1", 0)
    try:
        assert main(["serve", str(calibrated_run), "--port", str(busy.server_address[1])]) == 2
        error = capsys.readouterr().err
        assert "cannot listen on 127.0.0.1 port" in error and "in use" in error
    finally:
        busy.server_close()
