"""The report's two pages: Markdown (figures as relative links) and self-contained HTML.

A section is (title, caption, kind, payload): kind "table" (a DataFrame), "figure" (a PNG path,
embedded as base64) or "link" (a file beside the report, e.g. a video, linked by name).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from mgs.atomic import write_text


def write_pages(out: Path, paper: str, sections) -> None:
    write_text(out / "report.md", _markdown(paper, sections))
    write_text(out / "report.html", _html(paper, sections))


def _markdown(paper: str, sections) -> str:
    lines = ["# mgs report", "", f"Paper numbers: {paper}.", ""]
    for title, caption, kind, payload in sections:
        lines += [f"## {title}", "", caption, ""]
        if kind == "table":
            lines += [payload.to_markdown(index=False, disable_numparse=True), ""]
        elif kind == "link":
            lines += [f"[{payload.name}]({payload.name})", ""]
        else:
            lines += [f"![{title}]({payload.name})", ""]
    return "\n".join(lines)


_STYLE = """body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
p.caption{color:#555;font-style:italic}"""


def _html(paper: str, sections) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>mgs report</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>mgs report</h1>", f"<p>Paper numbers: {html.escape(paper)}.</p>"]
    for title, caption, kind, payload in sections:
        parts += [f"<h2>{html.escape(title)}</h2>",
                  f'<p class="caption">{html.escape(caption)}</p>']
        if kind == "table":
            parts.append(payload.to_html(index=False, border=0, escape=True))
        elif kind == "link":  # large files (videos) stay beside the page
            name = html.escape(Path(payload).name)
            parts.append(f'<p><a href="{name}">{name}</a></p>')
        else:  # embedded, so the file works when mailed or moved
            data = base64.b64encode(Path(payload).read_bytes()).decode("ascii")
            parts.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
