"""`mgs view` in headless Chromium (the page shows the render, the block toggles work, Ctrl-C
exits 0), `mgs view --screenshot` and `mgs render` feeding the report, bad inputs."""

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import imageio.v3 as iio
import numpy as np
import pytest
import yaml
from PIL import Image

from mgs.blocks import Run, train_all
from mgs.view.browser import HeadlessPage, find_chromium
from mgs.cli import main
from mgs.errors import InputError
from mgs.evaluate import evaluate_run
from mgs.partition import PartitionConfig, partition_scene
from mgs.report import make_report
from mgs.view import SCREENSHOT, VIDEO

try:
    find_chromium()
    NO_CHROMIUM = False
except InputError:
    NO_CHROMIUM = True
needs_chromium = pytest.mark.skipif(NO_CHROMIUM, reason="chromium is not installed "
                                                        "(Debian: apt-get install -y chromium)")

# the smallest run with every file the viewer reads: two blocks, one round, no fine-tuning
TRAIN = dict(iterations=4, lr_max_steps=4, voxel_size=0.05, start_stat=2, update_from=2,
             update_interval=2, update_until=3, eval_interval=2, checkpoint_interval=4, threads=2)
MOMENTUM = dict(mode="full", rounds=1, iterations_per_round=2, final_iterations=0)
PAGE = (1000, 700)
PANEL_WIDTH = 340  # viser's side panel, on the right
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def viewed_run(tiny_scene, tmp_path_factory):
    root = tmp_path_factory.mktemp("view") / "results" / "city"
    root.mkdir(parents=True)
    (root / "scene").symlink_to(tiny_scene)
    (root / "config.yaml").write_text(yaml.safe_dump({"train": TRAIN, "momentum": MOMENTUM}))
    partition_scene(root / "scene", root / "partition",
                    PartitionConfig(block_dim=[2, 1, 1], assignment="center", min_cameras=2))
    train_all(Run.open(root))
    evaluate_run(root, warmup=0)
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scene_region(png: bytes) -> np.ndarray:
    """The screenshot's 3D area: left of the panel, below the notification strip, right of the
    axes gizmo (bottom left)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return pixels[200:, 80:-PANEL_WIDTH]


def _wait_for_picture(page, timeout=120.0) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while True:
        region = _scene_region(page.screenshot())
        if region.std() > 8 or time.monotonic() > deadline:
            return region
        time.sleep(1.0)


def _click(page, label: str) -> None:
    """Click the checkbox of a viser GUI row by its label text."""
    clicked = page.evaluate(f"""(() => {{
        for (const label of document.querySelectorAll('body *')) {{
            if (label.children.length || label.textContent.trim() !== {label!r}) continue;
            let row = label;  // up to the first ancestor holding a checkbox: the GUI row
            while (row && !row.querySelector('input[type=checkbox]')) row = row.parentElement;
            const boxes = row ? row.querySelectorAll('input[type=checkbox]') : [];
            if (boxes.length === 1) {{ boxes[0].click(); return true; }}
        }}
        return false; }})()""")
    assert clicked, f"no checkbox labelled {label!r}"
    time.sleep(1.0)  # the page sends GUI changes throttled: quicker clicks can be merged


@pytest.mark.slow
@needs_chromium
def test_viewer_page_shows_the_render_toggles_blocks_and_stops_on_ctrl_c(viewed_run, tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # the server's log goes to a file: an unread pipe fills up and blocks the server
    log_file = (tmp_path / "view.log").open("w+")
    server = subprocess.Popen([sys.executable, "-m", "mgs.cli", "view", str(viewed_run),
                               "--port", str(port), "--render-size", "200"], env=env,
                              stdout=log_file, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "view.log").read_text()
                assert time.monotonic() < deadline, "the viewer did not start within 120 s"
                time.sleep(0.5)
        with HeadlessPage(*PAGE, timeout=60) as page:
            page.goto(url)
            page.wait_for("document.body && document.body.innerText.includes('block 1')",
                          "the block checkboxes", timeout=60)
            text = page.text()
            assert "block 0" in text and "block 1" in text and "block 2" not in text
            assert "PSNR" in text and "cell boxes" in text
            full = _wait_for_picture(page)
            # the model is drawn: not blank, not one colour
            assert full.std() > 8, "the viewer shows no rendered scene"
            assert np.ptp(full.reshape(-1, 3), axis=0).max() > 100
            # every block, the cells and the cameras switched off: only the black background
            for label in ("block 0", "block 1", "cell boxes", "cameras"):
                _click(page, label)
            deadline = time.monotonic() + 60
            while (empty := _scene_region(page.screenshot())).std() > 2:
                assert time.monotonic() < deadline, "switching every block off left a picture"
                time.sleep(1.0)
            assert empty.mean() < 5 < full.mean()
        server.send_signal(signal.SIGINT)
        start = time.monotonic()
        server.wait(timeout=60)
        output = (tmp_path / "view.log").read_text()
        assert server.returncode == 0, output
        assert time.monotonic() - start < 15
        assert "Traceback" not in output and "server closed" in output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log_file.close()


def _gradient_energy(region: np.ndarray) -> float:
    grey = region.mean(axis=2)
    return float((np.diff(grey, axis=0) ** 2).mean() + (np.diff(grey, axis=1) ** 2).mean())


@pytest.mark.slow
@needs_chromium
def test_viewer_renders_small_while_moving_and_at_the_canvas_size_at_rest(viewed_run):
    from mgs.view.scene import RunView
    from mgs.view.server import Viewer

    viewer = Viewer(RunView(viewed_run), port=_free_port(), render_size=64, rest_seconds=None)
    try:
        viewer._show(viewer._cell_nodes + viewer._camera_nodes, False)  # only the model
        with HeadlessPage(*PAGE, timeout=60) as page:
            page.goto(viewer.url)
            page.wait_for("document.body && document.body.innerText.includes('block 1')",
                          "the block checkboxes", timeout=60)
            viewer.wait_until_drawn(quiet=1.0, timeout=120)
            time.sleep(0.5)  # the browser draws the image on its next frame
            moving = _scene_region(page.screenshot())
            assert viewer.sent_sizes and max(max(s) for s in viewer.sent_sizes) == 64
            sent = len(viewer.sent_sizes)
            viewer.rest_seconds = 0.2  # the progressive render, as `mgs view` runs it
            viewer.redraw()
            viewer.wait_until_drawn(quiet=1.0, timeout=120)
            time.sleep(0.5)
            rest = _scene_region(page.screenshot())
            sizes = viewer.sent_sizes[sent:]
            # first the small frame, then one at the canvas size (the page minus the panel)
            assert max(sizes[0]) == 64 and min(sizes[-1]) > 4 * 64, sizes
            assert moving.std() > 8 and rest.std() > 8  # both show the model
            # 1.45x measured on this tiny, blurry model: the 64 px frame stretched is flatter
            assert _gradient_energy(rest) > 1.25 * _gradient_energy(moving)
    finally:
        viewer.close()


@pytest.mark.slow
@needs_chromium
def test_screenshot_and_flythrough_appear_in_the_report(viewed_run, tmp_path):
    assert main(["view", str(viewed_run), "--port", str(_free_port()), "--screenshot"]) == 0
    shot = np.asarray(Image.open(viewed_run / SCREENSHOT).convert("RGB"), dtype=np.float32)
    assert shot.shape == (800, 1280, 3)
    scene_part = shot[200:, 80:-PANEL_WIDTH]
    assert scene_part.std() > 8 and np.ptp(scene_part.reshape(-1, 3), axis=0).max() > 100
    assert main(["render", str(viewed_run), "--frames", "4", "--size", "64x48"]) == 0
    page = make_report(None, tmp_path / "report", run_dirs=[viewed_run]).read_text()
    assert "city: viewer" in page and "city: fly-through" in page
    assert 'href="city_flythrough.mp4"' in page
    assert (tmp_path / "report" / "city_flythrough.mp4").read_bytes() == \
        (viewed_run / VIDEO).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["orbit", "cameras"])
def test_render_writes_an_mp4_with_the_frames_asked_for(viewed_run, tmp_path, path):
    out = tmp_path / "video" / f"{path}.mp4"
    assert main(["render", str(viewed_run), "--path", path, "--frames", "6", "--fps", "10",
                 "--size", "96x72", "--out", str(out)]) == 0
    frames = iio.imread(out)
    assert frames.shape == (6, 72, 96, 3)
    for frame in frames.astype(np.float32):
        assert frame.std() > 5  # the model is in every frame
    if path == "orbit":  # the circle moves the view: consecutive frames differ
        assert np.abs(np.diff(frames.astype(np.float32), axis=0)).mean() > 1
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind


def test_render_and_view_refuse_bad_input(tmp_path, capsys):
    assert main(["render", str(tmp_path), "--size", "95x72"]) == 2
    assert "even" in capsys.readouterr().err
    assert main(["render", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["view", str(tmp_path / "run")]) == 2
    assert "config.yaml" in capsys.readouterr().err
