"""Property-based tests (Hypothesis) of the input boundary: whatever bytes, settings or names arrive, cada either
takes them or refuses them with its own error type and one line, never another exception; and what it writes (CSV,
JSON, HTML) reads back as it was meant."""

import csv
import html
import io
import json
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cada.config import Settings
from cada.config_files import make_settings, parse_override, read_config
from cada.data.dataset import BadImageError, rgb_array
from cada.files import printable, write_json
from cada.predict import FORMULA_STARTS, spreadsheet_safe
from cada.report.html import _per_class_table
from cada.serve import RequestError, multipart_images

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png(width: int, height: int, mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    image = Image.fromarray(rng.integers(0, 256, (height, width, *channels), dtype=np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@FAST
@given(st.binary(max_size=2048))
def test_any_bytes_decode_to_an_rgb_image_or_a_bad_image_error(data):
    try:
        rgb = rgb_array(io.BytesIO(data), "upload.png")
    except BadImageError as error:
        assert str(error).startswith("cannot read image upload.png") and "BytesIO" not in str(error)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@FAST
@given(
    st.integers(1, 64), st.integers(1, 64), st.sampled_from(["L", "RGB", "RGBA"]), st.integers(0, 2**16),
    st.integers(0, 2047), st.binary(min_size=1, max_size=8),
)  # fmt: skip
def test_real_images_decode_at_their_size_and_damaged_ones_are_refused(width, height, mode, seed, cut, junk):
    data = _png(width, height, mode, seed)
    assert rgb_array(io.BytesIO(data)).shape == (height, width, 3)
    damaged = data[: cut % len(data)] + junk  # truncated, then garbage
    assume(damaged != data)
    try:
        rgb_array(io.BytesIO(damaged), "damaged.png")
    except BadImageError:
        pass


SETTING_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["base", "aligner", "image_size", "method", "seed", "base.lr", "base.iters", "aligner.hidden",
                        "patchcore.coreset_ratio", "tile", "resize", "nope", "base.nope"])  # fmt: skip


@FAST
@given(st.dictionaries(KEYS, SETTING_VALUES, max_size=4))
def test_any_config_mapping_gives_settings_or_one_value_error(config):
    try:
        made = make_settings(config=config)
    except ValueError as error:
        assert "\n" not in str(error) and len(str(error)) < 2000
        return
    assert isinstance(made, Settings) and made.validate() is made


@FAST
@given(st.text(max_size=300))
@example("?")  # a mapping with a null key (found by this test in CI)
@example("1: 2")
def test_any_config_file_text_gives_a_mapping_or_one_value_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("config") / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        data = read_config(path)
    except ValueError as error:
        assert str(error).startswith(f"--config {path}")
        return
    assert isinstance(data, dict)
    try:
        make_settings(config=data)
    except ValueError:
        pass


@FAST
@given(KEYS, st.text(max_size=40))
def test_any_set_override_gives_settings_or_one_value_error(key, value):
    override = f"{key}={value}"
    path, _ = parse_override(override)
    assert path == key.split(".")
    try:
        make_settings(overrides=[override])
    except ValueError as error:
        assert "\n" not in str(error)


@FAST
@given(st.binary(max_size=600), st.text(string.printable, max_size=60))
def test_any_multipart_body_gives_files_or_a_400(body, boundary):
    try:
        images = multipart_images(body, f"multipart/form-data; boundary={boundary}")
    except RequestError as error:
        assert error.status == 400
        return
    assert all(isinstance(name, str) and isinstance(data, bytes) for name, data in images)


NAMES = st.text(st.sampled_from(string.ascii_letters + string.digits + " ._-()[]"), min_size=1, max_size=20).filter(
    lambda name: name.strip() == name  # a blank or padded file name is trimmed (blank: the field name instead)
)


@FAST
@given(st.lists(st.tuples(NAMES, st.binary(max_size=50)), min_size=1, max_size=4))
def test_multipart_bodies_give_back_their_files(files):
    boundary = "b0undary-cada"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode()
            + data
            + b"\r\n"
            for name, data in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    found = multipart_images(body, f"multipart/form-data; boundary={boundary}")
    assert found == files


@FAST
@given(st.text(max_size=40))
def test_csv_cells_read_back_as_text_that_no_spreadsheet_runs(name):
    text = printable(name)
    cell = spreadsheet_safe(text)
    table = io.StringIO(newline="")
    csv.writer(table).writerow([cell, "0.5"])
    (row,) = csv.reader(io.StringIO(table.getvalue(), newline=""))
    assert row == [cell, "0.5"]  # quoting keeps commas, quotes and newlines inside the cell
    assert cell == ("'" + text if text.startswith(FORMULA_STARTS) else text) and not cell.startswith(FORMULA_STARTS)


@FAST
@given(st.dictionaries(st.text(max_size=10), st.floats(allow_nan=True) | st.text(max_size=10), max_size=5))
def test_json_is_written_strictly_or_refused_whole(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("json") / "out.json"
    if any(isinstance(v, float) and not np.isfinite(v) for v in data.values()):
        with pytest.raises(ValueError):
            write_json(path, data)
        assert not path.exists()  # no half-written file either
    else:
        write_json(path, data)
        assert json.loads(path.read_text(encoding="utf-8")) == data


@FAST
@given(st.text(max_size=30), st.text(max_size=30))
def test_html_tables_escape_every_name(align_name, class_name):
    page = _per_class_table({"per_class": {align_name: {class_name: {"i_auroc": 0.5}}}})
    cells = [cell.split("</td>")[0] for cell in page.split("<td>")[1:3]]
    assert [html.unescape(cell) for cell in cells] == [align_name, class_name]
    assert not any(mark in cell for cell in cells for mark in "<>\"'")


@pytest.mark.parametrize("text", ["=1+1", "+cmd", "-2", "@x", "\tx"])
def test_the_formula_characters_get_an_apostrophe(text):
    assert spreadsheet_safe(text) == "'" + text
