"""A block's views cached once in the run folder: same pixels and cameras, rebuilt on change,
and block jobs that find them import no image or COLMAP library."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mgs.scene import load_scene
from mgs.train import load_views
from mgs.view_cache import CACHE_DIR, block_views

REPO = Path(__file__).resolve().parents[1]


def _run_folder(tmp_path, tiny_scene):
    root = tmp_path / "run"
    root.mkdir()
    shutil.copytree(tiny_scene, root / "scene")
    return root


def _no_scene():
    raise AssertionError("the scene was loaded although the cache is valid")


def test_cached_views_equal_decoded_ones_and_skip_the_scene(tmp_path, tiny_scene):
    root = _run_folder(tmp_path, tiny_scene)
    scene = load_scene(root / "scene")
    names = scene.train_names[:5]
    cpu = torch.device("cpu")
    decoded = load_views([scene.camera(n) for n in names], 2, scene.scene_dir, cpu)
    first = block_views(root, 0, names, lambda: load_scene(root / "scene"), 2, None, cpu, "t")
    again = block_views(root, 0, names, _no_scene, 2, None, cpu, "t")
    assert isinstance(again[0].pixels, np.memmap)  # mapped, not read
    for views in (first, again):
        assert [v.name for v in views] == names
        for view, reference in zip(views, decoded):
            assert view.pixels.dtype == np.uint8
            assert torch.equal(view.image, reference.image)  # bit for bit
            assert torch.equal(view.K, reference.K) and torch.equal(view.viewmat, reference.viewmat)
            assert (view.width, view.height) == (reference.width, reference.height)
    # another block, another resolution or background: their own cache entries
    assert block_views(root, 1, names, lambda: scene, 1, None, cpu, "t")[0].width == scene.camera(
        names[0]).width
    with pytest.raises(AssertionError, match="cache is valid"):
        block_views(root, 0, names, _no_scene, 2, (1.0, 1.0, 1.0), cpu, "t")


def test_a_changed_image_rebuilds_the_cache(tmp_path, tiny_scene):
    root = _run_folder(tmp_path, tiny_scene)
    scene = load_scene(root / "scene")
    names = scene.train_names[:3]
    cpu = torch.device("cpu")
    before = block_views(root, 0, names, lambda: scene, 1, None, cpu, "t")[1].image.clone()
    # the second image replaced by the third: same size, other content
    image_dir = scene.camera(names[1]).image_path.parent
    shutil.copyfile(image_dir / names[2], image_dir / names[1])
    loaded = []
    after = block_views(root, 0, names, lambda: loaded.append(1) or load_scene(root / "scene"), 1,
                        None, cpu, "t")
    assert loaded == [1]
    assert not torch.equal(after[1].image, before)
    assert torch.equal(after[1].image, after[2].image)
    # one pixel file per block: the stale key's was removed
    assert len(list((root / CACHE_DIR).glob("views_0.*.npy"))) == 1
    meta = json.loads((root / CACHE_DIR / "views_0.json").read_text())
    assert [v["name"] for v in meta["views"]] == names


def test_a_missing_image_is_reported_not_served_from_the_cache(tmp_path, tiny_scene):
    from mgs.errors import InputError

    root = _run_folder(tmp_path, tiny_scene)
    scene = load_scene(root / "scene")
    names = scene.train_names[:2]
    block_views(root, 0, names, lambda: scene, 1, None, torch.device("cpu"), "t")
    scene.camera(names[0]).image_path.unlink()
    with pytest.raises(InputError, match="does not exist"):
        block_views(root, 0, names, lambda: load_scene(root / "scene"), 1, None,
                    torch.device("cpu"), "t")


@pytest.mark.slow
def test_block_job_with_a_cache_imports_no_image_or_colmap_library(tmp_path, tiny_scene):
    """A later round of `mgs train-block`, in its own process, as the workflow runs it."""
    import yaml

    from mgs.blocks import Run, init_blocks, train_block
    from mgs.partition import PartitionConfig, partition_scene

    root = _run_folder(tmp_path, tiny_scene)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "train": dict(iterations=4, lr_max_steps=4, eval_interval=100, checkpoint_interval=100,
                      threads=1),
        "momentum": dict(mode="full", rounds=2, iterations_per_round=1)}))
    partition_scene(root / "scene", root / "partition",
                    PartitionConfig(block_dim=[1, 1, 1], assignment="center", min_cameras=2))
    run = Run.open(root)
    init_blocks(run)
    train_block(run, 1, 0)  # writes the cache
    from mgs.blocks import sync_round

    sync_round(run, 1)
    code = ("import sys, mgs.cli\n"
            f"code = mgs.cli.main(['train-block', '--run', {str(root)!r}, '--round', '2', "
            "'--block', '0'])\n"
            "heavy = ('pycolmap', 'PIL', 'matplotlib', 'skimage', 'pandas', 'rich.table')\n"
            "print([m for m in heavy if m in sys.modules], code)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] 0"
    assert run.block_path(2, 0).is_file()
