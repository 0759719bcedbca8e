"""The report tells the truth at a glance (issue 32): one cost per architecture, its latency
timed with every other architecture of the run in one interleaved pass (median and spread); one
colour per method and one marker per model in every figure and the HTML legend; labels that
never sit on one another."""

from __future__ import annotations

import itertools
import re
import textwrap

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.text import Text
from torch import nn

import kdistill.models.cost as cost_module
import kdistill.report.plots as plots_module
from kdistill.compress import quantize_dynamic_linear
from kdistill.models import create_model
from kdistill.models.cost import CostBook, architecture_key, interleaved_times, latency_summary
from kdistill.recipes import Experiment, load_recipe
from kdistill.report.plots import label_layout, plot_tradeoff
from kdistill.report.style import ReportStyle
from kdistill.report.writer import write_report

# -- one cost per architecture -----------------------------------------------------------------


def test_the_architecture_key_ignores_names_and_weights_but_not_shapes_or_types():
    torch.manual_seed(0)
    first = create_model("middle_student")
    torch.manual_seed(1)
    second = create_model("middle_student")  # other weights
    assert not torch.equal(first.state_dict()["conv1.weight"], second.state_dict()["conv1.weight"])
    shape = (1, 28, 28)
    assert architecture_key(first, shape) == architecture_key(second, shape)
    wider = create_model("middle_student", channels=[4, 9])
    assert architecture_key(wider, shape) != architecture_key(first, shape)
    assert architecture_key(first, (1, 32, 32)) != architecture_key(first, shape)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    relu6 = nn.Sequential(nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 2))  # same shapes
    assert architecture_key(mlp, (8,)) != architecture_key(relu6, (8,))
    assert architecture_key(quantize_dynamic_linear(mlp), (8,)) != architecture_key(mlp, (8,))


class Recorder(nn.Module):
    def __init__(self, name: str, calls: list[str], width: int = 3):
        super().__init__()
        self.name, self.calls = name, calls
        self.layer = nn.Linear(3, width)

    def forward(self, x):
        self.calls.append(self.name)
        return x


def test_the_pass_is_round_robin_with_the_order_rotated_every_round():
    calls: list[str] = []
    models = [Recorder(name, calls) for name in "abc"]
    times = interleaved_times(models, [torch.zeros(1, 3)], repeats=3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"  # warm-up, then 3 rotated rounds
    assert [len(t[0]) for t in times] == [3, 3, 3]


def test_a_load_change_during_the_pass_falls_on_every_architecture_alike(monkeypatch):
    """A machine that slows down steadily (each forward pass 2 % slower than the one before):
    two architectures of equal speed, timed one after the other as before issue 32, differ by
    a fifth; timed together, by under 3 %."""
    now = [0.0]
    monkeypatch.setattr(cost_module, "_clock", lambda: now[0])

    class Loaded(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.layer = nn.Linear(3, width)  # another architecture, the same speed

        def forward(self, x):
            now[0] += 0.001 * (1 + 0.02 * forward_count())
            return x

    count = itertools.count()

    def forward_count() -> int:
        return next(count)

    a, b = Loaded(3), Loaded(4)
    book = CostBook((3,), repeats=25, warmup=0, batch_sizes=(1,))
    cost_a, cost_b = book.add(a, name="a"), book.add(b, name="b")
    book.measure_latency()
    together = cost_b["latency_ms"]["1"] / cost_a["latency_ms"]["1"]
    assert together == pytest.approx(1.0, abs=0.03)
    assert cost_a["timed_with"] == 2 and cost_a["repeats"] == 25
    low, high = cost_a["latency_iqr_ms"]["1"]
    assert low < cost_a["latency_ms"]["1"] < high  # the load ramp is the spread
    # the old way: each model measured alone, one after the other
    alone_a = cost_module.model_cost(a, (3,), repeats=25, warmup=0, batch_sizes=(1,))
    alone_b = cost_module.model_cost(b, (3,), repeats=25, warmup=0, batch_sizes=(1,))
    assert alone_b.latency_ms[1] / alone_a.latency_ms[1] > 1.2


def test_latency_summary_is_the_median_quartiles_and_extremes():
    median, iqr, extremes = latency_summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert median == 3.0 and iqr == (2.0, 4.0) and extremes == (1.0, 5.0)
    assert latency_summary([7.0]) == (7.0, (7.0, 7.0), (7.0, 7.0))


def test_a_model_changed_after_its_cost_was_taken_is_refused():
    book = CostBook((3,), repeats=1, warmup=0, batch_sizes=(1,))
    model = nn.Sequential(nn.Linear(3, 3))
    book.add(model)
    model.append(nn.Linear(3, 5))  # another architecture now: its latency would be wrong
    with pytest.raises(RuntimeError, match="changed in place"):
        book.measure_latency()


# -- a small run of the demo's shape: one architecture under two names --------------------------
RECIPE = """
name: truth
seed: 0
seeds: 2
data: {dataset: digits, val_size: 100, train_limit: 400, test_limit: 60}
teacher: {model: middle_student, train: {epochs: 1, progress: false}}
students:
  - {name: full, model: middle_student, kwargs: {channels: [2, 2]}}
  - {name: scarce, model: middle_student, kwargs: {channels: [2, 2]}, labelled: 40}
  - {name: other, model: middle_student, kwargs: {channels: [3, 2]}, labelled: 80}
train: {epochs: 1, progress: false}
distill:
  methods:
    kd: [{loss: kd}]
    hard_kd: [{loss: hard_kd}]
tune: {enabled: false}
cost: {repeats: 5, warmup: 1, batch_sizes: [1, 8]}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run, its report, and every figure the report drew (kept open for inspection)."""
    folder = tmp_path_factory.mktemp("truth")
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    recipe = load_recipe(path)
    figures: list = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots_module.plt, "close", figures.append)
        summary = Experiment(recipe, folder / "run", progress=False).run()
        table = write_report(summary, recipe, "test")
    torch.set_num_threads(previous)
    yield summary, table, figures, folder / "run"
    for figure in figures:
        plt.close(figure)


def _row_cells(table: str, model: str, method: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {model} | {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_rows_of_one_architecture_show_identical_cost_figures(run):
    summary, table, _, folder = run
    records = {(r.student, r.method, r.seed): r for r in summary.records}
    full, scarce, other = (records[(name, "kd", 1)] for name in ("full", "scarce", "other"))
    assert full.cost is scarce.cost  # one dict per architecture, by construction
    assert full.cost is records[("full", "alone", 0)].cost
    assert other.cost["architecture"] != full.cost["architecture"]
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    costs = slice(header.index("MACs"), header.index("peak mem (b8)") + 1)
    assert "latency b1 (ms, median [IQR] of 5, 1 thr)" in header
    shown = {
        (model, method): _row_cells(table, model, method)[costs]
        for model in ("full", "scarce", "other")
        for method in ("alone", "kd", "hard_kd")
    }
    assert len({tuple(cells) for (model, _), cells in shown.items() if model != "other"}) == 1
    # a median and its interquartile range, for every batch size
    assert all(re.fullmatch(r"[\d.]+ \[[\d.]+–[\d.]+\]", cell) for cell in shown["full", "kd"][2:4])
    # every architecture of the run (teacher, the 2-2 and the 3-2 students) in one pass
    assert full.cost["timed_with"] == 3 and full.cost["repeats"] == 5
    assert full.cost["measured_at"] == records[(None, "teacher", 0)].cost["measured_at"]
    report = (folder / "report.md").read_text()
    assert "this machine's at the moment it was measured" in report
    assert "3 architecture(s) timed together, round-robin, 5 passes each" in report


def _styled(figure) -> dict[str, tuple[str, str]]:
    """label → (colour, marker) of every artist a plot drew in a report style."""
    found = {}
    for axis in figure.axes:
        for line in axis.get_lines():
            gid = line.get_gid() or ""
            if gid.startswith("style:"):
                found[gid[len("style:") :]] = (to_hex(line.get_color()), line.get_marker())
    return found


def test_every_figure_and_the_html_legend_give_a_method_one_colour_and_a_model_one_marker(run):
    _, _, figures, folder = run
    drawn = {figure.axes[0].get_xlabel(): _styled(figure) for figure in figures}
    assert set(drawn) == {
        "epoch",
        "parameters",
        "labelled training images (the rest used without labels)",
    }
    colours: dict[str, set[str]] = {}
    markers: dict[str, set[str]] = {}
    for styled in drawn.values():
        assert styled, "a figure drew nothing in the report's style"
        for label, (colour, marker) in styled.items():
            model, method = label.split("/") if "/" in label else (label, label)
            colours.setdefault(method, set()).add(colour)
            markers.setdefault(model, set()).add(marker)
    # every method and model in every figure that shows it: one colour, one marker
    assert set(colours) == {"teacher", "alone", "kd", "hard_kd"}
    assert set(markers) == {"teacher", "full", "scarce", "other"}
    assert all(len(found) == 1 for found in [*colours.values(), *markers.values()])
    colour = {method: found.pop() for method, found in colours.items()}
    marker = {model: found.pop() for model, found in markers.items()}
    assert len(set(colour.values())) == 4 and len(set(marker.values())) == 4
    # a method's colour is the same in the curves, the trade-off and the labels plot
    in_all = [set(styled) for styled in drawn.values()]
    assert "scarce/kd" in set.intersection(*in_all)
    # the HTML legend says the same
    page = (folder / "report.html").read_text()
    legend_colours = dict(re.findall(r'data-method="([^"]+)" data-colour="([^"]+)"', page))
    legend_markers = dict(re.findall(r'data-model="([^"]+)" data-marker="([^"]+)"', page))
    assert legend_colours == colour and legend_markers == marker
    assert page.count('class="swatch"') == 4 and page.count('<svg class="marker"') == 4


def _assert_labels_apart(figure) -> int:
    """No two labels' text boxes intersect (`Text.get_window_extent`: an annotation's own
    extent also spans its line to the point), and every label lies on the page."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [
        (axis_number, text.get_text(), Text.get_window_extent(text, renderer))
        for axis_number, axis in enumerate(figure.axes)
        for text in axis.texts
    ]
    page = figure.bbox
    for _, label, box in boxes:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0, label
        assert box.y1 <= page.y1, label
    for (_, a, box_a), (_, b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} and {b!r} overlap"
    for number, axis in enumerate(figure.axes):  # nor does a label cover a point's marker
        for line in axis.get_lines():
            if (line.get_gid() or "").startswith("style:"):
                x, y = axis.transData.transform(line.get_xydata())[0]
                for _, label, box in (b for b in boxes if b[0] == number):
                    assert not box.contains(x, y), f"{label!r} covers {line.get_gid()}"
    return len(boxes)


# the demo (README): one architecture under two names, scores within a point of one another
DEMO = [
    ("teacher/teacher", 0.9065, 0.0, 6_508_298, 2.10),
    ("middle/alone", 0.8872, 0.0015, 4266, 0.13),
    ("middle/kd", 0.8783, 0.0021, 4266, 0.13),
    ("middle/hard_kd", 0.8843, 0.0010, 4266, 0.13),
    ("middle_n1000/alone", 0.8058, 0.0021, 4266, 0.13),
    ("middle_n1000/kd", 0.8766, 0.0016, 4266, 0.13),
    ("middle_n1000/hard_kd", 0.8787, 0.0021, 4266, 0.13),
]


@pytest.mark.parametrize("middle_ms", [0.13, 0.31])
def test_the_demo_layout_has_no_two_labels_on_one_another(tmp_path, monkeypatch, middle_ms):
    """The demo's points; `middle` at 0.31 ms is the issue's report (the same architecture
    2.4× slower than `middle_n1000`), where the labels of before issue 32 overlapped."""
    figures: list = []
    monkeypatch.setattr(plots_module.plt, "close", figures.append)
    points = []
    for label, score, std, params, ms in DEMO:
        ms = middle_ms if label.startswith("middle/") else ms
        points.append(
            {"label": label, "score": score, "std": std, "params": params,
             "latency_ms": {"1": ms}, "latency_iqr_ms": {"1": (0.95 * ms, 1.1 * ms)}}
        )  # fmt: skip
    assert plot_tradeoff(points, tmp_path / "tradeoff.png") is not None
    (figure,) = figures
    try:
        assert _assert_labels_apart(figure) == 2 * len(DEMO)  # every point labelled, twice
        for axis in figure.axes:  # the labels keep the order of their points
            heights = {t.get_text(): Text.get_window_extent(t).y0 for t in axis.texts}
            assert heights["middle/alone"] > heights["middle/hard_kd"] > heights["middle/kd"]
            assert heights["middle_n1000/kd"] > heights["middle_n1000/alone"]
    finally:
        plt.close(figure)


def test_the_run_report_labels_do_not_overlap(run):
    _, _, figures, _ = run
    (tradeoff,) = [f for f in figures if f.axes[0].get_xlabel() == "parameters"]
    assert _assert_labels_apart(tradeoff) == 2 * 10  # teacher + 3 students × 3 methods


def test_labels_that_cannot_all_be_stacked_give_a_legend():
    sizes = [(50.0, 10.0)] * 30
    pixels = [(100.0, 200.0 + i) for i in range(30)]
    assert label_layout(pixels, sizes, 8.0, 2.0, 0.0, 300.0) is None  # 30 × 12 > 300
    placed = label_layout(pixels[:10], sizes[:10], 8.0, 2.0, 0.0, 300.0)
    assert placed is not None and len({round(y) for _, y in placed}) == 10


def test_the_style_is_fixed_by_first_appearance():
    style = ReportStyle.of([("teacher", "teacher"), ("a", "alone"), ("a", "kd"), ("b", "dkd")])
    assert style.colours == {
        "teacher": "#000000",
        "alone": "#7f7f7f",
        "kd": "#1f77b4",
        "dkd": "#ff7f0e",
    }
    assert style.markers == {"teacher": "*", "a": "o", "b": "s"}
    assert style.of_label("b/kd") == ("#1f77b4", "s")


def test_a_crowd_of_points_gets_a_legend_in_their_colours_instead_of_labels(tmp_path, monkeypatch):
    figures: list = []
    monkeypatch.setattr(plots_module.plt, "close", figures.append)
    points = [
        {
            "label": f"s{i}/m{i % 3}",
            "score": 0.8 + 0.001 * i,
            "params": 1000,
            "latency_ms": {"1": 1.0},
        }
        for i in range(40)
    ]
    plot_tradeoff(points, tmp_path / "tradeoff.png")
    (figure,) = figures
    try:
        for axis in figure.axes:
            assert len(axis.texts) == 0
            legend = axis.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == [p["label"] for p in points]
            style = ReportStyle.of_labels(p["label"] for p in points)
            handles = legend.legend_handles
            assert [to_hex(h.get_color()) for h in handles] == [
                style.of_label(p["label"])[0] for p in points
            ]
    finally:
        plt.close(figure)
