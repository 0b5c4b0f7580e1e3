"""Optional per-run report sections, each made from files a run may hold beyond the workflow's
own outputs. A maker takes (run id, run folder, report folder) and returns sections (see
`mgs.report.page`); it returns [] when its files are absent.
"""

from __future__ import annotations

from pathlib import Path

from mgs.export import report_sections as export_sections
from mgs.view import report_sections as view_sections

MAKERS: list = [export_sections, view_sections]


def run_sections(run_id: str, root: Path, out: Path) -> list:
    sections = []
    for make in MAKERS:
        sections += make(run_id, root, out)
    return sections
