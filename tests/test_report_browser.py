"""report.html in a real browser (headless Chromium, Debian package `chromium`): it renders, every
image loads, and the console stays silent. Slow (a real run, then a browser); skipped where no
Chromium is installed (CI does not need it).

Set KDISTILL_SCREENSHOT=<file.png> to keep the screenshot the test takes."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdistill.cli import main
from kdistill.data.imagefolder import write_image_folder

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)"),
]

# runs in the page before anything loads: records errors, then on `load` writes what it found
# into the page, where --dump-dom shows it (the report itself carries no script)
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(
  e.message || ("failed to load " + ((e.target && e.target.alt) || "?"))), true);
const originalError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); originalError(...args); };
window.addEventListener("load", () => {
  const images = [...document.images];
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: images.map((i) => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                width: i.naturalWidth, shown: i.getBoundingClientRect().width})),
    errors: window.__errors,
    tables: document.querySelectorAll("table").length,
    rows: document.querySelectorAll("tr").length,
    text: document.body.innerText.length,
  });
  document.body.appendChild(probe);
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--window-size=1280,2600", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A real run: `kdistill init` on an image folder, two seeds, costs measured."""
    root = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(0)
    for split, count in (("train", 96), ("test", 48)):
        labels = np.arange(count) % 3
        noise = rng.integers(0, 90, size=(count, 16, 16))
        write_image_folder(root / "images", split, (noise + 60 * labels[:, None, None]).astype(
            np.uint8), labels, ["boots", "coats", "shirts"])  # fmt: skip
    recipe = root / "recipe.yaml"
    assert main(["init", "--teacher", "kdistill.examples.my_models:WideCNN", "--student",
                 "kdistill.examples.my_models:TinyCNN", "--data", str(root / "images"),
                 "--out", str(recipe)]) == 0  # fmt: skip
    out = root / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet", "--seeds", "2", "--no-tune",
                 "--set", "train.epochs=3", "--set", "teacher.train.epochs=3"]) == 0  # fmt: skip
    return out


def test_report_html_renders_with_every_image_and_a_silent_console(run_folder, tmp_path):
    report = (run_folder / "report.html").read_text()
    assert report.count("<img ") == 2  # curves.png and tradeoff.png, inlined
    probed = tmp_path / "probed.html"
    probed.write_text(report.replace("<head>", "<head>\n" + PROBE, 1))
    finished = chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert finished.returncode == 0, finished.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', finished.stdout, re.S)
    assert found, "the page did not finish loading: " + finished.stdout[-500:]
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["errors"] == []
    assert [image["ok"] for image in probe["images"]] == [True, True], probe["images"]
    # the PNGs decode at their saved size (matplotlib, dpi 120) and are drawn at a visible size
    assert all(image["width"] >= 800 and image["shown"] >= 600 for image in probe["images"])
    assert probe["tables"] == 1 and probe["rows"] == 1 + 3  # header, teacher, alone, kd

    # the report as shipped (no probe): the console shows nothing, the screenshot has content
    shot = tmp_path / "report.png"
    finished = chromium(f"--screenshot={shot}", (run_folder / "report.html").as_uri())
    assert finished.returncode == 0, finished.stderr[-2000:]
    console = [line for line in finished.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (2600, 1280) and len(np.unique(image)) > 50  # not a blank page
    if os.environ.get("KDISTILL_SCREENSHOT"):
        shutil.copy(shot, os.environ["KDISTILL_SCREENSHOT"])
