"""mgs.plan: the workflow's rerun triggers, dataset fingerprint and cluster requests as plain
Python (what workflow/rules/common.smk calls)."""

import json

import pytest

from mgs.plan import layout
from mgs.plan.resources import job_request, scaled_request
from mgs.plan.settings import folder_manifest, stage_keys


def test_retries_ask_for_more_memory_and_time():
    """The arithmetic a retried job gets (attempt 2, 3): rounded up, then times the attempt."""
    first, second, third = (scaled_request(a, 5400, 12) for a in (1, 2, 3))
    assert first == {"mem_mb": 6000, "runtime": 15}
    assert second == {"mem_mb": 12000, "runtime": 30} and third["mem_mb"] == 18000


def test_dataset_rerun_trigger_follows_image_content_not_the_folder(tmp_path):
    """A stray file, a touch, a copy or a move change nothing; an image changed deeper down, even
    at the same size, changes the digest."""
    import os
    import shutil

    cache = str(tmp_path / "digests.json")

    def manifest(path):
        folder_manifest.cache_clear()
        return folder_manifest(str(path), cache)

    deep = tmp_path / "data" / "train" / "images"
    deep.mkdir(parents=True)
    (deep / "0001.jpg").write_bytes(b"a" * 10)
    (tmp_path / "data" / "train" / "sparse").mkdir()
    (tmp_path / "data" / "train" / "sparse" / "cameras.bin").write_bytes(b"c")
    before = manifest(tmp_path / "data")
    (tmp_path / "data" / "notes.md").write_text("stray")
    (tmp_path / "data" / ".DS_Store").write_text("stray")
    os.utime(deep / "0001.jpg", ns=(1, 1))  # a touch (here: back to 1970)
    assert manifest(tmp_path / "data") == before
    shutil.copytree(tmp_path / "data", tmp_path / "copy")  # new mtimes, another path
    assert manifest(tmp_path / "copy") == before
    (tmp_path / "copy").rename(tmp_path / "moved")
    assert manifest(tmp_path / "moved") == before
    (deep / "0001.jpg").write_bytes(b"b" * 10)
    assert manifest(tmp_path / "data") != before
    assert str(deep / "0001.jpg") in json.loads((tmp_path / "digests.json").read_text())


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    import mgs.images

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "0001.jpg").write_bytes(b"a" * 10)
    cache = str(tmp_path / "digests.json")
    first = folder_manifest(str(tmp_path / "data"), cache)
    folder_manifest.cache_clear()
    monkeypatch.setattr(mgs.images, "file_digest", lambda path: pytest.fail(f"re-read {path}"))
    assert folder_manifest(str(tmp_path / "data"), cache) == first


def test_speed_only_keys_are_no_rerun_trigger():
    scene = {"source": "images", "path": "data/x", "resolution": 1, "up": None,
             "synthetic": {}, "sfm": {"threads": -1, "matching": "exhaustive"}}
    keys = stage_keys("scene", scene)
    assert keys == stage_keys("scene", dict(scene, sfm={**scene["sfm"], "threads": 8}))
    assert keys != stage_keys("scene", dict(scene, sfm={**scene["sfm"],
                                                                     "matching": "spatial"}))


def test_a_block_request_counts_its_cameras_and_its_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene = {"source": "synthetic", "resolution": 1, "synthetic": {"width": 1000, "height": 1000},
             "train": {"resolution": 1},
             "momentum": {"iterations_per_round": 100, "rounds": 2, "final_iterations": 0}}
    partition = tmp_path / layout.run_path("s", "partition", "partition.json")
    partition.parent.mkdir(parents=True)
    partition.write_text(json.dumps({"blocks": [
        {"id": 3, "train_cameras": ["a"] * 90, "validation_cameras": ["b"] * 10}]}))
    first = job_request("block", scene, "s", block=3, round=1)
    assert first["mem_mb"] == 5000  # 3,000 + 100 one-megapixel images of 12 MB, rounded up
    state = tmp_path / layout.round_state("s", 1, 3)
    state.parent.mkdir(parents=True)
    with open(state, "wb") as handle:
        handle.truncate(1_000_000_000)  # sparse: a 1 GB checkpoint on no disk
    second = job_request("block", scene, "s", block=3, round=2)
    assert second["mem_mb"] == 8000  # 4,200 + the checkpoint three times, rounded up
    assert job_request("block", scene, "s", block=3, round=2, attempt=2)["mem_mb"] == \
        2 * second["mem_mb"]


def test_the_merged_blocks_are_the_last_round_without_final_steps():
    assert layout.final_block("s", 2, rounds=5, final_iterations=0) == \
        "results/s/rounds/5/block_2.pt"
    assert layout.final_block("s", 2, rounds=5, final_iterations=10) == "results/s/final/block_2.pt"
    files = layout.report_files("s", 2, [0, 1], final_iterations=0)
    assert "results/s/rounds/2/decoder_1.pt" in files and "results/s/rounds/1/sync.tsv" in files
    assert not any("/final/" in f for f in files)
