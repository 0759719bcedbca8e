"""report.html in a real browser (headless Chromium, Debian package `chromium`): it renders, every
image loads, the legend draws its colours, and the console stays silent. Part of the default
suite (a small run, then two browser calls: seconds).

Skipped only where no Chromium is installed, with the reason. `.ci/run` installs Chromium and
sets KDISTILL_REQUIRE_CHROMIUM=1, which turns that skip into a failure: CI never passes without
having looked at the page.

The screenshot is saved beside the report in the test's run folder (`report-screenshot.png`);
with KDISTILL_ARTIFACTS=<folder> (`.ci/run`: runs/ci) it is copied there with report.html and
`browser-test.log`, the line the CI log shows. KDISTILL_SCREENSHOT=<file.png> copies it too."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdistill.cli import main
from kdistill.data.imagefolder import write_image_folder

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((path for path in map(shutil.which, BROWSERS) if path), None)

REQUIRED = os.environ.get("KDISTILL_REQUIRE_CHROMIUM") == "1"  # set by .ci/run
MISSING = "no Chromium (Debian: apt-get install chromium; .ci/run installs it)"

# a closed network: nothing to fetch at start-up, a fresh profile per call
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--window-size=1280,2600",
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _chromium_here():  # module scope: decided before the run the test needs is made
    if CHROMIUM is None:
        if REQUIRED:
            pytest.fail(f"KDISTILL_REQUIRE_CHROMIUM=1 (set by .ci/run) but {MISSING}")
        pytest.skip(MISSING)


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
    swatches: [...document.querySelectorAll(".legend .swatch")].map((s) => ({
      colour: getComputedStyle(s).backgroundColor, width: s.getBoundingClientRect().width})),
    markers: [...document.querySelectorAll(".legend svg.marker")].map(
      (m) => m.getBoundingClientRect().width),
  });
  document.body.appendChild(probe);
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="kdistill-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip


def chromium_version() -> str:
    found = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60)
    return found.stdout.strip() or "Chromium (version unknown)"


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
    # the legend: a visible swatch in each method's colour (teacher black, alone grey, kd
    # blue), a marker per model (teacher, the student)
    assert [s["colour"] for s in probe["swatches"]] == [
        "rgb(0, 0, 0)", "rgb(127, 127, 127)", "rgb(31, 119, 180)"
    ]  # fmt: skip
    assert all(s["width"] > 5 for s in probe["swatches"])
    assert len(probe["markers"]) == 2 and all(width > 5 for width in probe["markers"])

    # the report as shipped (no probe): the console shows nothing, the screenshot has content
    shot = run_folder / "report-screenshot.png"
    finished = chromium(f"--screenshot={shot}", (run_folder / "report.html").as_uri())
    assert finished.returncode == 0, finished.stderr[-2000:]
    console = [line for line in finished.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (2600, 1280) and len(np.unique(image)) > 50  # not a blank page
    line = (
        f"browser test: {chromium_version()} rendered report.html: {len(probe['images'])} of "
        f"{len(probe['images'])} images loaded, {probe['tables']} table of {probe['rows']} rows, "
        f"{len(probe['swatches'])} legend colours, console silent ({len(console)} messages), "
        f"screenshot {image.shape[1]}×{image.shape[0]} with {len(np.unique(image))} grey levels"
    )
    artifacts = os.environ.get("KDISTILL_ARTIFACTS")
    if artifacts:
        folder = Path(artifacts)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / shot.name)
        shutil.copy(run_folder / "report.html", folder / "report.html")
        line += f", saved as {folder / shot.name}"
        (folder / "browser-test.log").write_text(line + "\n")
    if os.environ.get("KDISTILL_SCREENSHOT"):
        shutil.copy(shot, os.environ["KDISTILL_SCREENSHOT"])
    print(line)
