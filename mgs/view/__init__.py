"""`mgs view RUN` (the merged model in a web browser, `mgs.view.server`) and `mgs render RUN` (a
fly-through video, `mgs.view.flythrough`), and the report section showing what they wrote.

Kept free of heavy imports: every `mgs` command imports this module to build its parser.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mgs.atomic import atomic_path
from mgs.errors import InputError
from mgs.view.files import PATHS, SCREENSHOT, VIDEO

__all__ = ["PATHS", "SCREENSHOT", "VIDEO", "add_parser", "report_sections"]


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise InputError(f"--size {text!r}: write it as WIDTHxHEIGHT, e.g. 320x240")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise InputError(f"--size {text}: H.264 needs even sizes of 16 pixels or more")
    return width, height


def report_sections(run_id: str, root: Path, out: Path) -> list:
    """The run's viewer screenshot (a figure) and fly-through video (a link), when present."""
    sections = []
    if (root / SCREENSHOT).is_file():
        sections.append((f"{run_id}: viewer", "`mgs view` in a browser: the merged model "
                         "rendered from the first test camera, block cells and cameras coloured "
                         "by block.", "figure", root / SCREENSHOT))
    if (root / VIDEO).is_file():
        target = out / f"{run_id}_flythrough.mp4"
        with atomic_path(target) as tmp:
            shutil.copyfile(root / VIDEO, tmp)
        sections.append((f"{run_id}: fly-through", "`mgs render` video of the merged model.",
                         "link", target))
    return sections


def _require(module: str, verb: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"`mgs {verb}` needs the package {module!r}: install the view extra "
                         "(`pip install -e '.[view]'` in this repository, or `make install`)")


def _run_view(args) -> None:
    _require("viser", "view")
    from mgs.view.server import Viewer
    from mgs.view.scene import RunView

    if args.render_size is not None and args.render_size < 16:
        raise InputError(f"--render-size {args.render_size} is too small; use 16 or more")
    viewer = Viewer(RunView(args.run, device=args.device), host=args.host, port=args.port,
                    render_size=args.render_size)
    if args.screenshot is None:
        viewer.serve()
    else:
        viewer.screenshot(args.screenshot or Path(args.run) / SCREENSHOT)


def _run_render(args) -> None:
    _require("imageio_ffmpeg", "render")
    from mgs.view.flythrough import render_video

    render_video(args.run, args.out, path=args.path, split=args.split, frames=args.frames,
                 fps=args.fps, size=parse_size(args.size) if args.size else None,
                 device=args.device)


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="look at a run's merged model in a web browser: blocks, "
                                    "cells, cameras, metrics (Ctrl-C stops it)")
    p.add_argument("run", help="run folder (model/, partition/, scene/, eval/metrics.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: reachable from other machines)")
    p.add_argument("--port", type=int, default=8080, help="port (the next free one if taken)")
    p.add_argument("--render-size", type=int, default=None,
                   help="longer side in pixels of the model's render (default 320 on the CPU, "
                        "960 on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--screenshot", nargs="?", const="", default=None, metavar="PNG",
                   help="open the viewer in headless Chromium, save a screenshot and exit "
                        f"(default RUN/{SCREENSHOT.as_posix()}, which `mgs report` shows)")
    p.set_defaults(func=_run_view)

    p = sub.add_parser("render", help="fly-through video (MP4) of a run's merged model")
    p.add_argument("run", help="run folder (model/, partition/, scene/)")
    p.add_argument("--path", choices=PATHS, default="orbit",
                   help="orbit: a circle above the scene centre; cameras: along the camera path")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="cameras followed by --path cameras (and whose size the video takes)")
    p.add_argument("--out", help=f"MP4 to write (default RUN/{VIDEO.as_posix()}, which "
                                 "`mgs report` links)")
    p.add_argument("--frames", type=int, default=120, help="number of frames (default 120)")
    p.add_argument("--fps", type=int, default=30, help="frames per second (default 30)")
    p.add_argument("--size", help="WIDTHxHEIGHT, even (default: the views' training size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=_run_render)
