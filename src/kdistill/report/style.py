"""One colour per method and one marker per model, fixed for a whole report.

Every figure of a run's report (curves, trade-off, labels plot) and the HTML legend take their
colours and markers from one `ReportStyle`, built once from the rows of the results table, so a
colour means the same method in every plot: the teacher black, the student alone grey, the
distillation methods the tab10 colours in the recipe's order; the teacher a star, the students
circle, square, triangle, … in the recipe's order.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from matplotlib.colors import to_hex
from matplotlib.markers import MarkerStyle
from matplotlib.path import Path as MplPath

TEACHER = "teacher"
ALONE = "alone"
FIXED_COLOURS = {TEACHER: "#000000", ALONE: "#7f7f7f"}
# tab10 without its grey (the student alone's)
METHOD_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#bcbd22", "#17becf",
)  # fmt: skip
TEACHER_MARKER = "*"
MODEL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "d")
MARKER_NAMES = {
    "*": "star", "o": "circle", "s": "square", "^": "triangle", "D": "diamond",
    "v": "down triangle", "P": "plus", "X": "cross", "h": "hexagon", "<": "left triangle",
    ">": "right triangle", "p": "pentagon", "d": "thin diamond",
}  # fmt: skip


def split_label(label: str) -> tuple[str, str]:
    """(model, method) of a report label: "middle/kd" → ("middle", "kd"), "teacher" →
    ("teacher", "teacher"); a label without a slash (a compression stage) is its own model
    and method."""
    if "/" in label:
        model, method = label.split("/", 1)
        return model, method
    return label, label


@dataclass
class ReportStyle:
    """method → colour and model → marker, in first-seen order."""

    colours: dict[str, str] = field(default_factory=dict)
    markers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> ReportStyle:
        """The style of (model, method) pairs, e.g. the rows of a results table in order."""
        style = cls()
        for model, method in pairs:
            style.colour(method)
            style.marker(model)
        return style

    @classmethod
    def of_labels(cls, labels: Iterable[str]) -> ReportStyle:
        return cls.of(split_label(label) for label in labels)

    def colour(self, method: str) -> str:
        """The method's colour (a new method takes the next free colour)."""
        if method not in self.colours:
            if method in FIXED_COLOURS:
                self.colours[method] = FIXED_COLOURS[method]
            else:
                taken = sum(1 for m in self.colours if m not in FIXED_COLOURS)
                self.colours[method] = METHOD_COLOURS[taken % len(METHOD_COLOURS)]
        return self.colours[method]

    def marker(self, model: str) -> str:
        """The model's marker (a new model takes the next free marker)."""
        if model not in self.markers:
            if model == TEACHER:
                self.markers[model] = TEACHER_MARKER
            else:
                taken = sum(1 for m in self.markers if m != TEACHER)
                self.markers[model] = MODEL_MARKERS[taken % len(MODEL_MARKERS)]
        return self.markers[model]

    def of_label(self, label: str) -> tuple[str, str]:
        """(colour, marker) of a report label ("middle/kd", "teacher")."""
        model, method = split_label(label)
        return self.colour(method), self.marker(model)

    def text(self) -> str:
        """The legend in words, for report.md."""
        colours = ", ".join(f"{m} {_colour_name(c)}" for m, c in self.colours.items())
        markers = ", ".join(f"{m} {MARKER_NAMES.get(k, k)}" for m, k in self.markers.items())
        return f"Figures: colour = method ({colours}); marker = model ({markers})."

    def html(self) -> str:
        """The legend as HTML: a swatch per method and the marker (drawn as inline SVG from
        matplotlib's own path) per model; nothing is loaded."""
        methods = " ".join(
            f'<span class="key" data-method="{html.escape(m)}" data-colour="{c}">'
            f'<span class="swatch" style="background:{c}"></span>{html.escape(m)}</span>'
            for m, c in self.colours.items()
        )
        models = " ".join(
            f'<span class="key" data-model="{html.escape(m)}" data-marker="{html.escape(k)}">'
            f"{marker_svg(k)}{html.escape(m)}</span>"
            for m, k in self.markers.items()
        )
        return (
            '<div class="legend"><p><strong>Colour = method:</strong> '
            f"{methods}</p><p><strong>Marker = model:</strong> {models}</p></div>"
        )


def _colour_name(colour: str) -> str:
    names = {
        "#000000": "black", "#7f7f7f": "grey", "#1f77b4": "blue", "#ff7f0e": "orange",
        "#2ca02c": "green", "#d62728": "red", "#9467bd": "purple", "#8c564b": "brown",
        "#e377c2": "pink", "#bcbd22": "olive", "#17becf": "cyan",
    }  # fmt: skip
    return names.get(to_hex(colour), colour)


def marker_svg(marker: str, size: int = 14, colour: str = "#333333") -> str:
    """An inline SVG of matplotlib's marker path (the shape the figures draw)."""
    style = MarkerStyle(marker)
    path = style.get_path().transformed(style.get_transform())
    commands: list[str] = []
    for vertices, code in path.iter_segments():
        points = [f"{x:.3f},{-y:.3f}" for x, y in zip(vertices[::2], vertices[1::2])]
        if code == MplPath.MOVETO:
            commands.append("M" + points[0])
        elif code == MplPath.LINETO:
            commands.append("L" + points[0])
        elif code == MplPath.CURVE3:
            commands.append("Q" + " ".join(points))
        elif code == MplPath.CURVE4:
            commands.append("C" + " ".join(points))
        elif code == MplPath.CLOSEPOLY:
            commands.append("Z")
    return (
        f'<svg class="marker" width="{size}" height="{size}" viewBox="-0.6 -0.6 1.2 1.2" '
        f'aria-hidden="true"><path d="{" ".join(commands)}" fill="{colour}"/></svg>'
    )


def point_styles(labels: Sequence[str], style: ReportStyle | None) -> list[tuple[str, str]]:
    """(colour, marker) of each label; without a style, one built from these labels."""
    style = style or ReportStyle.of_labels(labels)
    return [style.of_label(label) for label in labels]
