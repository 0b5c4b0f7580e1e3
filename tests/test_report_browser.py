"""report.html opened in headless Chromium: it renders, with its tables and embedded images.

Debian: `apt-get install -y chromium`. Skipped when no chromium is installed.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from mgs.evaluate import ALL_METRICS
from mgs.report import make_report

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _fake_results(root):
    """One evaluated run named like a paper scene, without training (the report only reads)."""
    run = root / "building"
    rng = np.random.default_rng(0)
    gt = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    render = np.clip(gt.astype(int) + rng.integers(-30, 30, gt.shape), 0, 255).astype(np.uint8)
    _png(run / "eval" / "gt" / "00000.png", gt)
    _png(run / "eval" / "renders" / "00000.png", render)
    values = {m: 0.5 for m in ALL_METRICS} | {"psnr": 20.0, "psnr_cc": 21.0}
    (run / "eval" / "per_view.csv").write_text(
        "index,image,file,width,height,render_seconds," + ",".join(values) + "\n"
        "0,view_0000.png,00000.png,64,48,0.01," + ",".join(str(v) for v in values.values()) + "\n")
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"mode": "full", "num_views": 1, "downsampling_factor": 1, "metrics": values, "fps": 50.0,
         "peak_memory_mb": 400.0, "anchors": 1000, "device": "cpu"}))
    stripes = np.zeros((120, 160, 3), np.uint8)
    stripes[:, ::20] = (200, 40, 40)
    _png(run / "partition" / "partition.png", stripes)
    (run / "rounds" / "1").mkdir(parents=True)
    (run / "rounds" / "1" / "sync.tsv").write_text(
        "round\tblock\tpsnr\tssim\tpsnr_ema\tssim_ema\tweight\n1\t0\t20\t0.6\t20\t0.6\t1\n"
        "1\t1\t18\t0.5\t18\t0.5\t1.2\n")
    return root


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                             "(Debian: apt-get install -y chromium)")
def test_report_html_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "report"
    page = make_report(_fake_results(tmp_path / "results"), out)
    url = page.resolve().as_uri()
    profile = tmp_path / "profile"
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000", url],
                   check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<table") == 2  # results and the paper comparison
    assert dom.count("<img") == 3 and "data:image/png;base64," in dom
    assert "Momentum-GS" in dom
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 10  # not a blank page
    # the red stripes of the partition image and the coloured plots are drawn: saturated pixels
    saturation = pixels.max(-1) - pixels.min(-1)
    assert (saturation > 100).sum() > 500
