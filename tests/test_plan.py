"""mgs.plan: the workflow's rerun triggers, dataset fingerprint and cluster requests as plain
Python (what workflow/rules/common.smk calls)."""

import json

import pytest

from mgs.plan import layout
from mgs.plan.resources import gpu_constraint, job_request, scaled_request
from mgs.plan.rerun import rerun_guard
from mgs.plan.settings import folder_manifest, stage_keys


def test_retries_ask_for_more_memory_and_time():
    """The arithmetic a retried job gets (attempt 2, 3): rounded up, then times the attempt."""
    first, second, third = (scaled_request(a, 5400, 12, "both") for a in (1, 2, 3))
    assert first == {"mem_mb": 6000, "runtime": 15}
    assert second == {"mem_mb": 12000, "runtime": 30} and third["mem_mb"] == 18000
    assert scaled_request(2, 5400, 12, "time") == {"mem_mb": 6000, "runtime": 30}
    assert scaled_request(2, 5400, 12, "memory") == {"mem_mb": 12000, "runtime": 15}


@pytest.mark.parametrize("log, cause", [
    ("step 900\nmgs: SIGTERM at the job's time limit\nmgs train-block: stopped on SIGTERM", "time"),
    ("step 900\nmgs: SIGTERM\nmgs train-block: stopped on SIGTERM after step 912", "both"),
    ("slurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026 DUE TO TIME LIMIT ***", "time"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "gpu"),
    ("training 4000 anchors\nstep 400/1000", "memory"),  # killed without a word
    (None, "both"),
])
def test_a_retry_grows_what_the_last_attempt_ran_out_of(tmp_path, monkeypatch, log, cause):
    monkeypatch.chdir(tmp_path)
    scene = {"source": "synthetic", "resolution": 1, "synthetic": {"width": 1000, "height": 1000},
             "train": {"resolution": 1}, "coarse_iterations": 1000,
             "momentum": {"iterations_per_round": 100, "rounds": 2, "final_iterations": 0},
             "cluster": {"constraint": "a40", "retry_constraint": "a100_80g"}}
    if log is not None:
        path = tmp_path / layout.run_path("s", "logs", "coarse.log")
        path.parent.mkdir(parents=True)
        path.write_text(log)
    first = job_request("coarse", scene, "s")
    second = job_request("coarse", scene, "s", attempt=2)
    assert second["ran_out"] == cause
    assert (second["mem_mb"] > first["mem_mb"]) == (cause in ("memory", "both"))
    assert (second["runtime"] > first["runtime"]) == (cause in ("time", "both"))
    assert gpu_constraint(scene, 2, cause) == ("a100_80g" if cause == "gpu" else "a40")


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


def test_teacher_and_sync_trigger_block_reruns_only_when_they_change_something():
    momentum = {"mode": "full", "rounds": 4, "final_iterations": 0, "keep_rounds": 2,
                "consistency_weight": 0.5}
    scene = {"source": "images", "resolution": 1, "up": None, "train": {}, "momentum": momentum}
    before = stage_keys("blocks", scene)  # a run made before teacher and sync existed
    defaults = dict(momentum, teacher="step", sync="average", teacher_sync_momentum=0.5)
    assert stage_keys("blocks", dict(scene, momentum=defaults)) == before
    for changed in ({"teacher": "global"}, {"sync": "fit"}, {"teacher": "global-ema"}):
        assert stage_keys("blocks", dict(scene, momentum={**defaults, **changed})) != before
    ema = dict(defaults, teacher="global-ema")
    assert stage_keys("blocks", dict(scene, momentum=ema)) != \
        stage_keys("blocks", dict(scene, momentum=dict(ema, teacher_sync_momentum=0.9)))
    shared = dict(defaults, mode="shared")  # no teacher in this mode: the key shapes nothing
    assert stage_keys("blocks", dict(scene, momentum=dict(shared, teacher="global-ema"))) == \
        stage_keys("blocks", dict(scene, momentum=shared))


def test_export_settings_rerun_the_merge_alone():
    momentum = {"mode": "full", "rounds": 4, "final_iterations": 0}
    scene = {"source": "images", "resolution": 1, "up": None, "train": {}, "momentum": momentum}
    before = stage_keys("merge", scene)  # a run made before the export section existed
    assert before == stage_keys("final", scene)
    made_so = {"sh_degree": 1, "refine_steps": 600, "photo_weight": 0.0}  # what its PLY had
    assert stage_keys("merge", dict(scene, export=made_so)) == before
    defaults = dict(made_so, photo_weight=1.0)  # the photo refinement remakes such a PLY once
    now = stage_keys("merge", dict(scene, export=defaults))
    assert now != before
    for changed in ({"sh_degree": 2}, {"refine_steps": 0}, {"photo_weight": 0.5}):
        other = dict(scene, export={**defaults, **changed})
        assert stage_keys("merge", other) not in (before, now)
        assert stage_keys("final", other) == stage_keys("final", scene)  # blocks stay


def test_a_block_request_counts_its_cameras_and_its_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scene = {"source": "synthetic", "resolution": 1, "synthetic": {"width": 1000, "height": 1000},
             "train": {"resolution": 1},
             "momentum": {"iterations_per_round": 100, "rounds": 2, "final_iterations": 0}}
    partition = tmp_path / layout.run_path("s", "partition", "partition.json")
    partition.parent.mkdir(parents=True)
    partition.write_text(json.dumps({"blocks": [
        {"id": 3, "train_cameras": ["a"] * 90, "validation_cameras": ["b"] * 10}]}))
    first = job_request("train_block", scene, "s", block=3, round=1)
    assert first["mem_mb"] == 4000  # 3,000 + 100 one-megapixel uint8 images of 3 MB, rounded up
    state = tmp_path / layout.round_state("s", 1, 3)
    state.parent.mkdir(parents=True)
    with open(state, "wb") as handle:
        handle.truncate(1_000_000_000)  # sparse: a 1 GB checkpoint on no disk
    second = job_request("train_block", scene, "s", block=3, round=2)
    assert second["mem_mb"] == 7000  # 3,300 + the checkpoint three times, rounded up
    assert second["gpu_mem_mb"] == 5000  # 1,000 + images 300 + state twice + 1,500 render, up
    assert job_request("train_block", scene, "s", block=3, round=2, attempt=2)["mem_mb"] == \
        2 * second["mem_mb"]  # no log: both grow


def test_the_merged_blocks_are_the_last_round_without_final_steps():
    assert layout.final_block("s", 2, rounds=5, final_iterations=0) == \
        "results/s/rounds/5/block_2.pt"
    assert layout.final_block("s", 2, rounds=5, final_iterations=10) == "results/s/final/block_2.pt"
    files = layout.report_files("s", 2, [0, 1], final_iterations=0)
    assert "results/s/rounds/2/decoder_1.pt" in files and "results/s/rounds/1/sync.tsv" in files
    assert not any("/final/" in f for f in files)


def _jobs(scene, rounds, blocks, final=False):
    jobs = [("train_block", {"scene": scene, "r": str(r), "b": str(b)})
            for r in rounds for b in blocks]
    jobs += [("sync", {"scene": scene, "r": str(r)}) for r in rounds]
    if final:
        jobs += [("finalize_block", {"scene": scene, "b": str(b)}) for b in blocks]
    return jobs + [("merge", {"scene": scene})]


SCENES = {"rubble": {"momentum": {"rounds": 120, "final_iterations": 0, "keep_rounds": 2}}}


def test_a_rerun_of_the_named_block_alone_passes():
    jobs = _jobs("rubble", [120], [3])
    assert rerun_guard(jobs, ["results/rubble/rounds/120/block_3.pt"], SCENES) is None
    assert rerun_guard(_jobs("rubble", range(1, 121), range(8)), [], SCENES) is None  # no -R


def test_a_rerun_that_rebuilds_pruned_rounds_stops_and_says_why():
    jobs = _jobs("rubble", range(1, 121), range(8))
    message = rerun_guard(jobs, ["results/rubble/rounds/119/block_3.pt"], SCENES)
    assert "would run 1081 jobs (960 train_block, 120 sync, 1 merge)" in message
    assert "keep_rounds (2) removed" in message and "rounds 1-118 of every block" in message
    assert "-R results/rubble/rounds/120/block_3.pt" in message
    assert "--config allow_full_rerun=true" in message
    assert rerun_guard(jobs, ["results/rubble/rounds/119/block_3.pt"], SCENES, allow=True) is None


def test_a_rerun_of_an_older_round_names_the_later_rounds():
    jobs = _jobs("rubble", [119], [3]) + _jobs("rubble", [120], range(8))
    message = rerun_guard(jobs, ["results/rubble/rounds/119/block_3.pt"], SCENES)
    assert "block(s) 0, 1, 2, 4, 5, 6, 7 of scene rubble" in message
    assert "later round" in message


def test_a_sigterm_says_whether_it_came_at_the_time_limit(monkeypatch):
    import time

    from mgs.cli_support import _sigterm_cause

    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    assert _sigterm_cause() == "SIGTERM"
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 60))
    assert _sigterm_cause() == "SIGTERM at the job's time limit"
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 3600))
    assert _sigterm_cause() == "SIGTERM before the job's time limit"


def test_allow_full_rerun_from_the_command_line_is_a_boolean():
    from mgs.errors import MgsError
    from mgs.plan.config import check_workflow_config

    config = {"scenes": {"demo": {}}, "allow_full_rerun": "true"}  # as --config passes it
    check_workflow_config(config)
    assert config["allow_full_rerun"] is True
    with pytest.raises(MgsError, match="allow_full_rerun"):
        check_workflow_config({"scenes": {"demo": {}}, "allow_full_rerun": "sure"})


def test_a_rerun_that_redoes_init_says_keep_rounds_removed_round_0():
    jobs = [("init", {"scene": "rubble"})] + _jobs("rubble", range(1, 121), range(8))
    message = rerun_guard(jobs, ["results/rubble/rounds/1/block_3.pt"], SCENES)
    assert "round 0's block checkpoints" in message and "init and every round" in message
