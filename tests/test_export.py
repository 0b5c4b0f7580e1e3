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
from mgs.sh import SH_C0
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
    assert row["sh_degree"] == 1  # the merge default: colours as degree-1 SH
    # the .splat keeps the degree-0 colour, rounded to 1/255 like the opacity; this tiny run's
    # decoder barely depends on the view, so the renders still agree to well above 40 dB
    assert row["psnr_export_ply"] > 40
    assert abs(row["psnr_export_gt"] - row["psnr_ply_gt"]) < 0.1
    # refined on the training photos (export.photo_weight 1): no worse than the model itself
    assert row["psnr_ply_gt"] > row["psnr_model_gt"] - 0.1
    make_report(None, tmp_path / "report", run_dirs=[root])
    page = (tmp_path / "report" / "report.md").read_text()
    assert "Compressed export" in page and "psnr_export_ply" in page


def test_export_without_a_merged_model_says_what_to_run(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "mgs merge" in capsys.readouterr().err


def sh_gaussians(n: int, degree: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gaussians = random_gaussians(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # within SPZ's one-byte range for the higher coefficients, [-1, 127/128]
    gaussians["sh"] = (torch.randn(n, (degree + 1) ** 2, 3, generator=g) * 0.3).clamp(-0.95, 0.95)
    gaussians["sh"][:, 0] = (gaussians["colors"] - 0.5) / SH_C0
    return gaussians


def test_spz_round_trip_is_within_the_quantisation(tmp_path):
    pytest.importorskip("gsply")
    from mgs.spz import read_spz, write_spz

    gaussians = sh_gaussians(2000, 3)
    gaussians["opacities"] = gaussians["opacities"].clamp(0.01, 0.99)
    gaussians["scales"] = gaussians["scales"].clamp(0.01, 2.0)
    path = tmp_path / "model.spz"
    write_spz(gaussians, path)
    back = read_spz(path)
    # gzip of 65 packed bytes a Gaussian (random values hardly compress), a PLY holds 248
    assert path.stat().st_size < 2000 * 66
    # positions: max |x| 200 → 15 integer bits + sign, 8 fractional bits
    assert (back["means"] - gaussians["means"]).abs().max() <= 0.5 / 2**8 + 1e-6
    assert torch.allclose(back["opacities"], gaussians["opacities"], atol=0.5 / 255 + 1e-6)
    assert (back["scales"].log() - gaussians["scales"].log()).abs().max() <= 0.5 / 16 + 1e-5
    dc_step = 1 / (0.15 * 255)
    assert (back["sh"][:, 0] - gaussians["sh"][:, 0]).abs().max() <= 0.5 * dc_step + 1e-5
    # one byte each: c · 128 + 128
    assert (back["sh"][:, 1:] - gaussians["sh"][:, 1:]).abs().max() <= 0.5 / 128 + 1e-6
    dot = (back["quats"] * gaussians["quats"]).sum(1).abs()
    assert dot.min() > np.cos(np.radians(1.0) / 2)  # 9 bits per component: well under 1°


def test_spz_stores_rub_axes_and_the_flip_keeps_every_sh_colour():
    from mgs.sh import sh_basis, sh_colors
    from mgs.spz import RUB_SH_SIGNS

    dirs = torch.randn(500, 3, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    assert torch.allclose(sh_basis(dirs * flip, 3), sh_basis(dirs, 3) * RUB_SH_SIGNS.double())
    # the colour a camera sees is the same in either frame
    gaussians = sh_gaussians(50, 3, seed=4)
    camera = torch.tensor([3.0, -2.0, 5.0])
    flipped_sh = gaussians["sh"] * RUB_SH_SIGNS[:, None]
    assert torch.allclose(sh_colors(gaussians["sh"], gaussians["means"], camera),
                          sh_colors(flipped_sh, gaussians["means"] * flip.float(),
                                    camera * flip.float()), atol=1e-5)


def test_spz_file_holds_rub_positions(tmp_path):
    gsply = pytest.importorskip("gsply")
    from mgs.spz import write_spz

    gaussians = sh_gaussians(100, 1)
    write_spz(gaussians, tmp_path / "model.spz")
    raw = torch.as_tensor(gsply.read_spz(tmp_path / "model.spz").means)
    expected = gaussians["means"] * torch.tensor([1.0, -1.0, -1.0])
    assert (raw - expected).abs().max() < 0.01


def test_export_spz_of_a_trained_run_renders_like_the_ply(evaluated_run):  # noqa: F811
    pytest.importorskip("gsply")
    run, _ = evaluated_run
    root = run.root
    assert main(["export", str(root), "--format", "spz"]) == 0
    table = pd.read_csv(root / "model" / "export.csv").set_index("format")
    row = table.loc["spz"]
    assert row["bytes"] == (root / "model" / "splats.spz").stat().st_size
    assert row["compression"] > 3  # 26 float32 columns at degree 1 against 29 bytes, gzipped
    assert row["psnr_export_ply"] > 35
    assert abs(row["psnr_export_gt"] - row["psnr_ply_gt"]) < 0.2
