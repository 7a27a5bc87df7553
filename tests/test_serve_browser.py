"""The web page of `cada serve` in a real browser: headless Chromium chooses images in the page's file input and
the page shows a card per image (benchmarks/serve_page.py drives it over the DevTools protocol). `.ci/run` installs
Debian's chromium where apt is available; without a browser the test is skipped, saying so."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_page.py"


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")),
    reason="no Chromium on this machine (Debian: apt-get install chromium); the page's browser test is skipped",
)
@pytest.mark.slow
def test_the_page_scores_chosen_images_in_a_real_browser(calibrated_run, tiny_data, tmp_path):
    images = [sorted((tiny_data / name / "test").rglob("*.png"))[-1] for name in ("weave", "marble", "washer")]
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(calibrated_run), *map(str, images), "--out", str(shot)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "page status: scored 3 image(s)" in done.stdout
    cards = [line for line in done.stdout.splitlines() if " score " in line and " threshold " in line]
    assert len(cards) == 3 and all((" normal " in card) != (" anomalous " in card) for card in cards)
    with Image.open(shot) as picture:
        assert picture.format == "PNG" and picture.size[0] == 1280 and picture.size[1] > 600
