"""`mgs export`: the .splat layout (writer, reader, size) and re-renders of a tiny trained run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_evaluate import evaluated_run  # noqa: F401 - the tiny trained run, as a fixture

from mgs.cli import main
from mgs.errors import InputError
from mgs.merge import read_splats
from mgs.report import make_report
from mgs.splat import read_splat, write_splat


def random_gaussians(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    quats = torch.randn(n, 4, generator=g)
    return {"means": torch.randn(n, 3, generator=g) * 50,
            "quats": quats / quats.norm(dim=1, keepdim=True),
            "scales": torch.rand(n, 3, generator=g) * 2 + 1e-3,
            "opacities": torch.rand(n, generator=g),
            "colors": torch.rand(n, 3, generator=g)}


def test_splat_round_trip_is_within_the_quantisation_and_32_bytes_each(tmp_path):
    gaussians = random_gaussians(1000)
    path = tmp_path / "model.splat"
    order = torch.as_tensor(write_splat(gaussians, path))
    assert path.stat().st_size == 32 * 1000
    decoded = read_splat(path)
    original = {k: v[order] for k, v in gaussians.items()}
    importance = original["scales"].double().prod(1) * original["opacities"].double()
    assert (importance[:-1] >= importance[1:]).all()  # largest first
    assert torch.equal(decoded["means"], original["means"])  # float32: exact
    assert torch.equal(decoded["scales"], original["scales"])
    assert (decoded["colors"] - original["colors"]).abs().max() <= 0.5 / 255 + 1e-6
    assert (decoded["opacities"] - original["opacities"]).abs().max() <= 0.5 / 255 + 1e-6
    # each component within half a step of 1/128 before renormalising: the same rotation
    # up to a small angle (q and -q are the same rotation)
    dot = (decoded["quats"] * original["quats"]).sum(1).abs()
    assert torch.allclose(decoded["quats"].norm(dim=1), torch.ones(1000), atol=1e-6)
    assert dot.min() > np.cos(np.radians(2.0) / 2)


def test_truncated_splat_is_refused(tmp_path):
    path = tmp_path / "model.splat"
    write_splat(random_gaussians(3), path)
    path.write_bytes(path.read_bytes()[:70])
    with pytest.raises(InputError, match="70 bytes, not a multiple of 32"):
        read_splat(path)


def test_export_of_a_trained_run_renders_like_the_ply(evaluated_run, tmp_path):  # noqa: F811
    run, _ = evaluated_run
    root = run.root
    assert main(["export", str(root), "--format", "splat"]) == 0
    splat, ply = root / "model" / "splats.splat", root / "model" / "splats.ply"
    count = len(read_splats(ply)["means"])
    assert splat.stat().st_size == 32 * count
    row = pd.read_csv(root / "model" / "export.csv").iloc[0]
    assert row["bytes"] == 32 * count and row["ply_bytes"] == ply.stat().st_size
    assert row["compression"] > 1.5  # 14 float32 columns (+ header) vs 32 bytes
    assert row["test_views"] == len(run.scene().test_names)
    assert row["sh_degree"] == 3  # the merge default: colours as degree-3 SH
    # the .splat keeps the degree-0 colour, rounded to 1/255 like the opacity; this tiny run's
    # decoder barely depends on the view, so the renders still agree to well above 40 dB
    assert row["psnr_export_ply"] > 40
    assert abs(row["psnr_export_gt"] - row["psnr_ply_gt"]) < 0.1
    assert abs(row["psnr_ply_gt"] - row["psnr_model_gt"]) < 0.1  # the PLY looks like the model
    make_report(None, tmp_path / "report", run_dirs=[root])
    page = (tmp_path / "report" / "report.md").read_text()
    assert "Compressed export" in page and "psnr_export_ply" in page


def test_export_without_a_merged_model_says_what_to_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "mgs merge" in capsys.readouterr().err
