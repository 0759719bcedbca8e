"""A self-contained `report.html` from the Markdown report: tables, text, and plots inlined.

Only the Markdown the reports write is understood: `#` headings, pipe tables, paragraphs,
`inline code`, **bold** and images `![alt](file.png)`. Images are read from the run folder and
embedded as base64 `data:` URIs, so the file needs nothing beside it and loads nothing from the
network (no scripts, no external style sheets, no remote images).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from kdistill.io import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { background: #f4f4f4; padding: 0.1em 0.3em; }
img { max-width: 100%; }
.legend p { margin: 0.3em 0; }
.legend .key { margin-right: 1.2em; white-space: nowrap; }
.legend .swatch { display: inline-block; width: 1.6em; height: 0.8em; margin-right: 0.35em;
                  vertical-align: middle; }
.legend svg.marker { margin-right: 0.3em; vertical-align: middle; }
"""

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    escaped = html.escape(text.strip().rstrip("\\").rstrip(), quote=False)
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    return _BOLD.sub(r"<strong>\1</strong>", escaped)


def _image(alt: str, source: str, folder: Path) -> str:
    path = folder / source
    if source.startswith(("http:", "https:", "//")) or not path.is_file():
        return f"<p><em>[missing image: {html.escape(source)}]</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    kind = "png" if path.suffix.lower() == ".png" else path.suffix.lower().lstrip(".")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/{kind};base64,{data}"></p>'


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, align, body = _cells(lines[0]), _cells(lines[1]), [_cells(x) for x in lines[2:]]
    numeric = [cell.endswith(":") and not cell.startswith(":") for cell in align]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    for row in body:
        cells = []
        for index, cell in enumerate(row):
            css = ' class="num"' if index < len(numeric) and numeric[index] else ""
            cells.append(f"<td{css}>{_inline(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def markdown_to_html(
    markdown: str, folder: Path, title: str, raw: dict[str, str] | None = None
) -> str:
    """The HTML page for `markdown`, with images read from `folder` and inlined. `raw`: lines
    (stripped) replaced by the given HTML, e.g. the report's legend in words by its colours."""
    raw = raw or {}
    blocks: list[str] = []
    lines = markdown.splitlines()
    index = 0
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append("<p>" + "<br>\n".join(_inline(x) for x in paragraph) + "</p>")
            paragraph.clear()

    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if not stripped:
            flush()
        elif stripped in raw:
            flush()
            blocks.append(raw[stripped])
        elif stripped.startswith("#"):
            flush()
            level = min(len(stripped) - len(stripped.lstrip("#")), 6)
            blocks.append(f"<h{level}>{_inline(stripped.lstrip('#'))}</h{level}>")
        elif stripped.startswith("|"):
            flush()
            table = []
            while index < len(lines) and lines[index].strip().startswith("|"):
                table.append(lines[index])
                index += 1
            blocks.append(_table(table) if len(table) >= 2 else _inline(table[0]))
            continue
        elif _IMAGE.fullmatch(stripped):
            flush()
            match = _IMAGE.fullmatch(stripped)
            assert match is not None
            blocks.append(_image(match.group(1), match.group(2), folder))
        else:
            paragraph.append(stripped)
        index += 1
    flush()
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(blocks)
        + "\n</body>\n</html>\n"
    )


def write_html(
    markdown: str,
    folder: Path,
    title: str,
    name: str = "report.html",
    raw: dict[str, str] | None = None,
) -> Path:
    """Write `<folder>/<name>`: the Markdown report as one self-contained HTML file (`raw`:
    see `markdown_to_html`)."""
    path = Path(folder) / name
    atomic_write_text(path, markdown_to_html(markdown, Path(folder), title, raw))
    return path
