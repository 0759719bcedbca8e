"""Every number the README and the documentation publish in a table comes from a committed
results file, and agrees with it.

The convention, in Markdown (README.md, docs/*.md): the last non-blank line above a table is a
comment naming the file(s) the run wrote, the columns that hold settings rather than
measurements, and the command::

    <!-- results: docs/results/demo.json; skip: labels; command: kdistill demo -->

    | student | labels | alone | kd |
    |---|---:|---:|---:|
    | middle | 1,000 | 80.58 ± 0.21 | 87.66 ± 0.16 |

Each figure in the table's body — outside the first column (the row's name), the `skip:`
columns (named by the start of their header, comma-separated) and code spans — must be a value
the file holds or that follows from it, printed to the figure's own precision: a number anywhere
in the file (also × 100 for percentages, and in the usual units: k / M / G, KiB / MiB / GiB, ms
from s, min from s; a text file — a command's saved output — holds the figures printed in it);
and for a run's results (`records`, as `kdistill run` writes `results.json`) every group's
per-seed values, mean and standard deviation of each metric, the gap closed, and the paired
differences between two methods of one student, seed by seed, with their mean and standard
deviation. A printed "mean ± std" of a run's results must match one series as a pair, and a
figure in a "gap closed" column one of the run's gaps. In a table of several files, a row that
names one of them (a link in a "results file" column) is checked against that file alone.

A table with figures and no such comment fails, as does a figure the file does not hold, or a
named file that does not exist. A table whose numbers are not measurements (formulas, field
defaults, example output) says so instead: ``<!-- not results: <why> -->``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RESULTS = re.compile(r"^<!--\s*results:\s*(?P<body>.*?)\s*-->\s*$")
NOT_RESULTS = re.compile(r"^<!--\s*not results:\s*(?P<why>.+?)\s*-->\s*$")
SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
# a figure: optional sign, digits (thousands commas allowed), decimals, exponent; never the tail
# of a word or a file name ("resnet8", "e8.json", "seg_probe-2026")
FIGURE = re.compile(
    r"(?<![\w.])(?P<sign>[−+-]?)(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?"
    r"(?:e(?P<exp>[−+-]?\d+))?(?![\w.]*\.json)"
)
SCALES = (1.0, 100.0, 1e-3, 1e-6, 1e-9, 2.0**-10, 2.0**-20, 2.0**-30, 1e3, 1 / 60)


# generated from the recipe schema by `kdistill reference` (tests/test_reference.py keeps it
# fresh): its numbers are field defaults and constraints, not measurements
NOT_PUBLISHED = {"recipe-reference.md"}


def published_pages(root: Path = ROOT) -> list[Path]:
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [page for page in pages if page.name not in NOT_PUBLISHED]


@dataclass
class Table:
    page: Path
    line: int  # 1-based line of the header row
    header: list[str]
    rows: list[list[str]]
    mark: str | None  # the comment above it
    body_lines: list[int] = field(default_factory=list)


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row; `\\|` and pipes inside code spans stay in the cell."""
    cells, cell, code = [], "", False
    text = line.strip().strip("|") if not line.strip().endswith("\\|") else line.strip()[1:]
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] == "|":
            cell += "|"
            i += 2
            continue
        if ch == "`":
            code = not code
        if ch == "|" and not code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        i += 1
    cells.append(cell.strip())
    return cells


def tables(page: Path, text: str | None = None) -> list[Table]:
    """Every table of a Markdown page outside fenced code, with the comment above it."""
    lines = (page.read_text() if text is None else text).split("\n")
    found, fence, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fence = not fence
        if (
            not fence
            and line.lstrip().startswith("|")
            and i + 1 < len(lines)
            and SEPARATOR.match(lines[i + 1].strip())
        ):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            mark = lines[j].strip() if j >= 0 and lines[j].strip().startswith("<!--") else None
            table = Table(page, i + 1, split_row(line), [], mark)
            k = i + 2
            while k < len(lines) and lines[k].lstrip().startswith("|"):
                table.rows.append(split_row(lines[k]))
                table.body_lines.append(k + 1)
                k += 1
            found.append(table)
            i = k
            continue
        i += 1
    return found


def clean(cell: str) -> str:
    """A cell without code spans, link targets, emphasis and HTML."""
    cell = re.sub(r"``.*?``|`[^`]*`", " ", cell)
    cell = re.sub(r"\]\([^)]*\)", "]", cell)
    cell = re.sub(r"<[^>]+>", " ", cell)
    return cell.replace("*", "").replace("\\", "")


@dataclass
class Figure:
    text: str
    value: float
    unit: float  # half of this is the rounding error the printed precision allows


def column_name(text: str) -> str:
    """A header as `skip:` names it: no backticks or emphasis, spaces collapsed, lower case."""
    return " ".join(text.replace("`", "").replace("*", "").split()).lower()


def figures(cell: str) -> list[Figure]:
    return [figure(m) for m in FIGURE.finditer(clean(cell))]


def figure(m: re.Match) -> Figure:
    """The figure of a match: its value and the precision it is printed to."""
    sign = -1.0 if m["sign"] in ("−", "-") else 1.0
    digits = m["int"].replace(",", "") + (m["frac"] or "")
    exp = int(m["exp"].replace("−", "-")) if m["exp"] else 0
    decimals = len(m["frac"]) - 1 if m["frac"] else 0
    return Figure(m.group(0), sign * float(digits) * 10.0**exp, 10.0 ** (exp - decimals))


def cell_problems(cell: str, values: Candidates, gap: bool = False) -> list[str]:
    """The figures of a cell that the file does not hold. "mean ± std" is checked as a pair
    against the series of a run's results when the file has any, else figure by figure; in a
    "gap closed" column (`gap`) of a run's results, against the rows' gaps only."""
    text = clean(cell)
    if gap and values.gaps:
        return [f.text for f in figures(cell) if not holds(values.gaps, f)]
    problems, matches = [], list(FIGURE.finditer(text))
    i = 0
    while i < len(matches):
        m = matches[i]
        between = text[m.end() : matches[i + 1].start()] if i + 1 < len(matches) else ""
        if values.pairs and between.strip() == "±":
            mean, std = figure(m), figure(matches[i + 1])
            if not pair_holds(values.pairs, mean, std):
                problems.append(f"{mean.text} ± {std.text}")
            i += 2
            continue
        fig = figure(m)
        if not holds(values.values, fig):
            problems.append(fig.text)
        i += 1
    return problems


def parse_mark(mark: str) -> dict[str, str]:
    body = RESULTS.match(mark)["body"]
    parts = {}
    for i, part in enumerate(body.split(";")):
        key, sep, value = part.partition(":")
        if i == 0:
            parts["results"] = part.strip()
        elif sep:
            parts[key.strip()] = value.strip()
    return parts


def numbers(tree) -> list[float]:
    """Every number in a JSON tree."""
    if isinstance(tree, bool):
        return []
    if isinstance(tree, (int, float)):
        return [float(tree)] if math.isfinite(tree) else []
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in numbers(value)]
    if isinstance(tree, list):
        return [v for value in tree for v in numbers(value)]
    return []


def run_figures(data: dict, pairs: list[tuple[float, float]]) -> list[float]:
    """What a run's results file implies: per group (student, method) and metric the per-seed
    values, mean and std; gap closed; paired differences between methods of one student.
    Each series' (mean, std) is also appended to `pairs`: a printed "mean ± std" must match
    one series as a whole."""
    out: list[float] = []
    groups: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for record in data.get("records", []):
        key = (record.get("student") or "teacher", record["method"])
        metrics = {"test_score": record["test_score"]}
        metrics.update({f"test/{k}": v for k, v in (record.get("test_metrics") or {}).items()})
        metrics.update({f"val/{k}": v for k, v in (record.get("val_metrics") or {}).items()})
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                groups.setdefault(key, {}).setdefault(name, {})[record["seed"]] = float(value)

    def stats(values: list[float]) -> list[float]:
        found = list(values) + [statistics.fmean(values)]
        if len(values) > 1:
            found.append(statistics.stdev(values))
            pairs.append((statistics.fmean(values), statistics.stdev(values)))
        return found

    for metrics in groups.values():
        for per_seed in metrics.values():
            out += stats(list(per_seed.values()))
    students = {student for student, _ in groups}
    for student in students:
        methods = [m for s, m in groups if s == student]
        for a, b in combinations(methods, 2):
            for name, per_seed in groups[(student, a)].items():
                other = groups[(student, b)].get(name, {})
                seeds = sorted(set(per_seed) & set(other))
                if seeds:
                    diffs = [per_seed[s] - other[s] for s in seeds]
                    out += stats(diffs)
                    out += stats([-d for d in diffs])
    out += run_gaps(data)
    return [v for v in out if v is not None]


def run_gaps(data: dict) -> list[float]:
    """The gap closed of every row of a run's results, on each metric."""
    found = []
    for row in data.get("rows", []):
        found += [row.get("gap_closed"), *(row.get("gaps") or {}).values()]
    return [v for v in found if v is not None]


@dataclass
class Candidates:
    values: list[float]  # sorted
    pairs: list[tuple[float, float]]  # (mean, std) of each series of a run's results, scaled
    gaps: list[float]  # sorted: the gaps closed of a run's results, in %


def candidates(paths: list[Path]) -> Candidates:
    found: list[float] = []
    pairs: list[tuple[float, float]] = []
    gaps: list[float] = []
    for path in paths:
        if path.suffix != ".json":  # a command's saved output (`kdistill check … > x.txt`)
            found += [fig.value for fig in figures(path.read_text())]
            continue
        data = json.loads(path.read_text())
        raw = numbers(data)
        series: list[tuple[float, float]] = []
        if isinstance(data, dict) and "records" in data:
            raw += run_figures(data, series)
            gaps += [100 * g for g in run_gaps(data)]
        found += [v * scale for v in raw for scale in SCALES]
        pairs += [(m * scale, s * scale) for m, s in series for scale in (1.0, 100.0)]
    return Candidates(sorted(set(found)), pairs, sorted(gaps))


def pair_holds(pairs: list[tuple[float, float]], mean: Figure, std: Figure) -> bool:
    """Some series' mean and std, each rounded to its figure's precision, are the pair."""
    tm, ts = mean.unit / 2 * (1 + 1e-9), std.unit / 2 * (1 + 1e-9)
    return any(abs(m - mean.value) <= tm and abs(s - std.value) <= ts for m, s in pairs)


def holds(values: list[float], figure: Figure) -> bool:
    """Some value, rounded to the figure's precision, is the figure (bisect over the sorted
    candidates)."""
    import bisect

    tolerance = figure.unit / 2 * (1 + 1e-9) + 1e-12
    i = bisect.bisect_left(values, figure.value - tolerance)
    return i < len(values) and values[i] <= figure.value + tolerance


def check_table(table: Table, root: Path = ROOT) -> list[str]:
    """The problems of one table, each naming page, line and figure; [] when it is sourced."""
    where = f"{table.page.relative_to(root)}:{table.line}"
    columns = list(range(1, len(table.header)))
    body = [
        (line, row[c], fig)
        for line, row in zip(table.body_lines, table.rows, strict=False)
        for c in columns
        if c < len(row)
        for fig in figures(row[c])
    ]
    if table.mark and NOT_RESULTS.match(table.mark):
        return []
    if table.mark is None or not RESULTS.match(table.mark):
        if body:
            first = body[0]
            return [
                f"{where}: a table with figures ({first[2].text!r}, line {first[0]}, …) and no "
                "'<!-- results: docs/results/<name>.json; command: … -->' above it"
            ]
        return []
    mark = parse_mark(table.mark)
    skip = {column_name(s) for s in mark.get("skip", "").split(",") if s.strip()}
    problems = []
    if not mark.get("command"):
        problems.append(f"{where}: the results comment names no 'command:'")
    paths = [root / p for p in mark["results"].split()]
    missing = [str(p.relative_to(root)) for p in paths if not p.is_file()]
    if missing or not paths:
        return problems + [f"{where}: results file(s) {missing or '(none named)'} do not exist"]
    values = candidates(paths)
    # a row that names one of the files (a link to it) is checked against that file alone
    own = {path.name: candidates([path]) for path in paths} if len(paths) > 1 else {}
    skipped = {c for c in columns if any(column_name(table.header[c]).startswith(s) for s in skip)}
    for line, row in zip(table.body_lines, table.rows, strict=False):
        named = [name for name in own if name in " ".join(row)]
        row_values = own[named[0]] if len(named) == 1 else values
        for c in columns:
            if c in skipped or c >= len(row):
                continue
            gap = "gap closed" in column_name(table.header[c])
            for text in cell_problems(row[c], row_values, gap):
                problems.append(
                    f"{table.page.relative_to(root)}:{line}: {text!r} (column "
                    f"{clean(table.header[c]).strip()!r}) is not in {mark['results']}"
                )
    return problems


def page_problems(page: Path, root: Path = ROOT) -> list[str]:
    return [problem for table in tables(page) for problem in check_table(table, root)]


@pytest.mark.parametrize("page", published_pages(), ids=lambda p: p.name)
def test_every_published_table_matches_its_results_file(page):
    problems = page_problems(page)
    assert not problems, "\n".join(problems)


def test_the_readme_publishes_its_headline_table_from_results_files():
    marked = [t for t in tables(ROOT / "README.md") if t.mark and RESULTS.match(t.mark)]
    assert marked, "the README's results table lost its results comment"
    assert all(parse_mark(t.mark)["results"].startswith("docs/results/") for t in marked)


def _copy_readme(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    shutil.copytree(ROOT / "docs" / "results", tmp_path / "docs" / "results")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    return tmp_path / "README.md"


@pytest.mark.parametrize(
    "right, wrong, reported",
    [
        # the demo's student alone (docs/results/demo.json): a mean ± std pair
        ("**88.72 ± 0.15**", "**88.73 ± 0.15**", "'88.73 ± 0.15'"),
        # the demo's gap closed with 1,000 labels: +70 % (0.703 in the file)
        ("| +70 % |", "| +71 % |", "'+71'"),
        # the function-matching teacher's accuracy, 91.73 %
        ("| 91.73 |", "| 91.78 |", "'91.78'"),
    ],
)
def test_a_planted_wrong_digit_fails(tmp_path, right, wrong, reported):
    """One digit planted wrong in a copy of the README: the check names the figure; the
    untouched copy passes."""
    readme = _copy_readme(tmp_path)
    assert page_problems(readme, tmp_path) == []
    text = readme.read_text()
    assert text.count(right) == 1
    readme.write_text(text.replace(right, wrong))
    problems = page_problems(readme, tmp_path)
    assert len(problems) == 1 and reported in problems[0], problems


def test_a_figure_without_a_file_fails(tmp_path):
    readme = _copy_readme(tmp_path)
    readme.write_text(
        readme.read_text().replace("docs/results/demo.json docs/results/function", "docs/results/")
        + "\n| run | accuracy % |\n|---|---:|\n| mine | 91.20 |\n"
    )
    problems = page_problems(readme, tmp_path)
    assert any("no '<!-- results:" in p for p in problems), problems
    assert any("do not exist" in p for p in problems), problems


def test_kdistill_report_rebuilds_the_published_figures(capsys):
    """`kdistill report docs/results/demo.json` prints the run's table from the file alone;
    the README's demo figures are in it."""
    from kdistill.cli import main

    assert main(["report", str(ROOT / "docs" / "results" / "demo.json")]) == 0
    table = capsys.readouterr().out
    for figure in ("88.72 ± 0.15", "87.83 ± 0.21", "80.58 ± 0.21", "87.66 ± 0.16", "+70 %"):
        assert figure in table
