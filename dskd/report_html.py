"""A Markdown report as one self-contained HTML page, its PNGs embedded.

Why: MLflow's artifact viewer renders a `.md` artifact without its images (it drops `data:` URLs and resolves
relative ones against the UI, not the run's artifacts), while it shows an `.html` artifact as a page. So the
study logs `report.html` next to `study_report.md`: the same text with every `![alt](file.png)` inlined as a
base64 `data:` image. Only the Markdown the reports write is understood: `#` headings, pipe tables, `- ` list
items, images, `**bold**` and `` `code` ``, paragraphs.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
_STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}"
          "th,td{border:1px solid #bbb;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
          "img{max-width:100%;border:1px solid #ddd}code{background:#f3f3f3}")


def image_sources(markdown: str) -> list[str]:
    """The files the Markdown shows as images, in order."""
    return [m["src"] for line in markdown.splitlines() if (m := _IMAGE.match(line.strip()))]


def markdown_to_html(markdown: str, directory: Path, title: str) -> str:
    """The page: images read from `directory` and embedded, so it needs nothing beside it."""
    body, table = [], []
    for line in markdown.splitlines() + [""]:
        text = line.strip()
        if text.startswith("|"):
            table.append(text)
            continue
        if table:
            body.append(_table(table))
            table = []
        if not text:
            continue
        if image := _IMAGE.match(text):
            body.append(_image(Path(directory) / image["src"], image["alt"]))
        elif heading := re.match(r"^(#{1,6}) (.*)$", text):
            level = len(heading[1])
            body.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
        elif text.startswith("- "):
            body.append(f"<ul><li>{_inline(text[2:])}</li></ul>")
        else:
            body.append(f"<p>{_inline(text)}</p>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _table(rows: list[str]) -> str:
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    cells = [row for row in cells if not all(re.fullmatch(r":?-+:?", c) for c in row)]  # the |---| rule
    head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)
