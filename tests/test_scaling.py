"""`mgs report --scaling` on a hand-written scaling.csv, and benchmarks/scaling.py's smallest
city end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mgs.cli import main
from mgs.report.scaling import fit_exponent

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = np.array([4, 16, 64])
ANCHORS = np.array([1500, 6100, 23800])


def _scaling_csv(path: Path) -> Path:
    """Costs with known growth: sync ∝ blocks^0.5, merge ∝ anchors, a flat block job; the
    train-block time carries noise so its exponent is a genuine least-squares fit."""
    rows = []
    noise = np.array([1.07, 0.95, 1.03])
    for i, (blocks, anchors) in enumerate(zip(BLOCKS, ANCHORS)):
        rows += [
            dict(blocks=blocks, stage="train-block", seconds=30.0 * blocks * noise[i],
                 cpu_seconds=20.0 * blocks, peak_rss_mb=520.0 * noise[i], anchors=anchors),
            dict(blocks=blocks, stage="sync", seconds=2.0 * blocks ** 0.5,
                 cpu_seconds=1.5 * blocks ** 0.5, peak_rss_mb=290.0 + blocks, anchors=anchors),
            dict(blocks=blocks, stage="merge", seconds=0.004 * anchors,
                 cpu_seconds=0.003 * anchors, peak_rss_mb=300.0, anchors=anchors),
        ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_report_scaling_table_holds_the_least_squares_exponents_and_a_figure(tmp_path):
    csv = _scaling_csv(tmp_path / "scaling.csv")
    out = tmp_path / "report"
    assert main(["report", "--scaling", str(csv), "--out", str(out)]) == 0
    fit = pd.read_csv(out / "scaling_fit.csv").set_index("stage")
    assert list(fit.index) == ["train-block", "sync", "merge"]  # the file's order
    noisy = 30.0 * BLOCKS * np.array([1.07, 0.95, 1.03])
    expected = np.polyfit(np.log(BLOCKS), np.log(noisy), 1)[0]
    assert fit.loc["train-block", "e wall vs blocks"] == pytest.approx(expected, abs=1e-6)
    assert fit.loc["train-block", "e wall vs blocks"] != pytest.approx(1.0, abs=1e-3)
    assert fit.loc["train-block", "e CPU vs blocks"] == pytest.approx(1.0, abs=1e-6)
    assert fit.loc["sync", "e wall vs blocks"] == pytest.approx(0.5, abs=1e-6)
    assert fit.loc["merge", "e wall vs anchors"] == pytest.approx(1.0, abs=1e-6)
    assert fit.loc["merge", "e RSS vs blocks"] == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(fit.loc["sync", "e wall vs anchors"])  # only merge and evaluate
    assert fit.loc["sync", "wall s"] == "4.0 / 8.0 / 16.0"
    figure = Image.open(out / "scaling.png")
    assert figure.width > 800 and len(np.unique(np.asarray(figure.convert("L")))) > 10
    md = (out / "report.md").read_text()
    assert "## Scaling" in md and "scaling.png" in md and "+0.50" in md
    assert 'src="data:image/png;base64,' in (out / "report.html").read_text()


def test_fit_exponent_needs_two_cities():
    assert np.isnan(fit_exponent([4, 4], [1.0, 2.0]))
    assert fit_exponent([2, 8], [3.0, 48.0]) == pytest.approx(2.0)


def test_report_scaling_bad_tables_fail_clearly(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", "--scaling", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "benchmarks/scaling.py" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"blocks": [4], "stage": ["sync"], "seconds": [1.0]}).to_csv(bad, index=False)
    assert main(["report", "--scaling", str(bad), "--out", str(out)]) == 2
    assert "peak_rss_mb" in capsys.readouterr().err
    negative = _scaling_csv(tmp_path / "negative.csv")
    frame = pd.read_csv(negative)
    frame.loc[0, "seconds"] = -1
    frame.to_csv(negative, index=False)
    assert main(["report", "--scaling", str(negative), "--out", str(out)]) == 2
    assert "seconds" in capsys.readouterr().err
    assert main(["report", "--out", str(out)]) == 2  # nothing to report on


@pytest.mark.slow
def test_scaling_benchmark_smallest_city_end_to_end(tmp_path):
    """4 blocks, 1 round of 2 steps and 1 final step: every stage runs as its own process and is measured; a
    second invocation reuses the finished city; the report draws the single city."""
    work = tmp_path / "work"
    command = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--work", str(work),
               "--blocks", "4", "--rounds", "1", "--iterations", "2", "--final-iterations", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # the aabb on the city's footprint and the 4x4 grid: its 2x2 inner cells are the blocks
    assert "partition: 4 blocks;" in done.stdout and "note:" not in done.stdout
    frame = pd.read_csv(work / "scaling.csv")
    assert list(frame["stage"]) == ["synth", "partition", "init", "train-block", "sync",
                                    "finalize", "merge", "evaluate"]
    assert (frame["blocks"] == 4).all() and (frame["anchors"] > 0).all()
    jobs = frame.set_index("stage")["jobs"]
    assert jobs["train-block"] == 4 and jobs["finalize"] == 4 and jobs["sync"] == 1
    assert (frame["peak_rss_mb"] > 100).all()  # a Python process with torch, in MB
    assert (frame["disk_mb"].diff().dropna() >= 0).all() and frame["ply_mb"].iloc[0] > 0
    assert not (work / "blocks_4" / "run" / "rounds").exists()  # heavy folders removed
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "finished earlier" in again.stdout
    assert main(["report", "--scaling", str(work / "scaling.csv"), "--out",
                 str(tmp_path / "report")]) == 0
