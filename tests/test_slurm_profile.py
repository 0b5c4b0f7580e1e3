"""The SLURM profile as users type it: `snakemake --profile slurm` from the repository root, and
the sbatch arguments every job of the demo and of the Rubble preset would get. The arguments are
built by the installed SLURM executor plugin's own functions from the resources of a dry run; a
fake scene and partition.json (Rubble's data is not here) get the dry run past the checkpoint."""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from test_workflow import copy_workflow, snakemake

submit_string = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
slurm_utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")

GPU_RULES = {"gsplat_build", "train_block", "finalize_block", "evaluate", "export", "merge",
             "coarse", "partition_ssim"}


class _Resources(dict):
    """The `job.resources` the plugin reads: .get() and attribute access."""

    def __getattr__(self, name):
        return self[name]


def dry_jobs(workdir: Path, *args: str) -> list[SimpleNamespace]:
    """Every job of `snakemake --profile slurm -n` in `workdir`: rule, wildcards, threads,
    resources as printed (numbers as int)."""
    result = snakemake(workdir, "--profile", "slurm", "-n", *args)
    jobs, job = [], None
    for line in (result.stdout + result.stderr).splitlines():
        match = re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line.strip())
        if match and not line.startswith(" "):
            job = SimpleNamespace(rule=match.group(1), wildcards={}, threads=1,
                                  resources=_Resources())
            jobs.append(job)
        elif job is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            if key == "threads":
                job.threads = int(value)
            elif key in ("wildcards", "resources"):
                for item in value.split(", "):
                    name, _, val = item.partition("=")
                    target = job.wildcards if key == "wildcards" else job.resources
                    target[name] = int(val) if val.isdigit() else val
    assert jobs, result.stdout[-3000:]
    return jobs


def sbatch_args(job: SimpleNamespace) -> dict[str, str]:
    """The options the plugin would pass to sbatch for this job (partition, time, mem, GPUs)."""
    params = {"run_uuid": "id", "slurm_logfile": "log", "comment_str": f"rule_{job.rule}",
              "account": "", "partition": f"-p {job.resources['slurm_partition']}",
              "workdir": ""}
    plugin_job = SimpleNamespace(resources=job.resources, threads=job.threads, name=job.rule)
    call = submit_string.get_submit_command(plugin_job, params)
    call += slurm_utils.set_gres_string(plugin_job)
    words, args = shlex.split(call), {}
    for i, word in enumerate(words):
        if word in ("-p", "-t", "--mem"):
            args[word] = words[i + 1]
        elif word.startswith(("--gpus=", "--gres=", "--cpus-per-task=")):
            name, value = word.split("=", 1)
            args[name] = value
    return args


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    time.sleep(0.01)  # strictly increasing mtimes: each file newer than what it is made from


def fake_partitioned_scene(workdir: Path, scene: str, blocks: int, train: int, test: int,
                           ssim: bool = False, source: str | None = None) -> None:
    """The files of a run up to its partition, in mtime order, so the dry run plans the rounds."""
    run = workdir / "results" / scene
    write(workdir / "results" / ".torch_extensions" / "gsplat_build.json", "{}")  # built once
    if source:
        (workdir / source).mkdir(parents=True, exist_ok=True)
        write(workdir / source / "images" / "0000.jpg", "x")
    write(run / "config.yaml", "# fake\n")
    names = [f"{i:04d}.jpg" for i in range(train + test)]
    write(run / "scene" / "scene.json", json.dumps(
        {"train_names": names[:train], "test_names": names[train:]}))
    if ssim:
        write(run / "coarse" / "checkpoint.pt", "fake")
    per_block = train * 2 // blocks  # visibility adds cameras beyond each cell
    write(run / "partition" / "partition.json", json.dumps({"blocks": [
        {"id": b, "train_cameras": names[:per_block], "validation_cameras": names[:per_block // 10]}
        for b in range(blocks)]}))
    for name in ("partition.tsv", "partition.png"):
        write(run / "partition" / name, "fake")


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("demo"))
    fake_partitioned_scene(workdir, "demo", blocks=4, train=72, test=8)
    return workdir


@pytest.fixture(scope="module")
def demo_jobs(demo_workdir):
    return dry_jobs(demo_workdir)


@pytest.mark.parametrize("target, message", [
    ("results/nosuch/final/block_0.pt", "scene 'nosuch' is not in the config (configured: "),
    ("results/demo/rounds/1/block_9.pt", "block 9 of scene demo is not in its partition"),
])
def test_unknown_scene_or_block_is_a_clear_error(demo_workdir, target, message):
    result = snakemake(demo_workdir, "-n", "-R", target, target, check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr, (result.stdout + result.stderr)[-2000:]


@pytest.fixture(scope="module")
def rubble_jobs(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("rubble"))
    fake_partitioned_scene(workdir, "rubble", blocks=8, train=1657, test=21, ssim=True,
                           source="data/mill19/rubble-pixsfm")
    return dry_jobs(workdir, "--configfile", "config/scenes/rubble.yaml")


def test_profile_slurm_from_the_repository_root_is_this_repositorys(tmp_path):
    """`--profile slurm` finds ./slurm (profiles/slurm) before a user's own `slurm` profile."""
    (tmp_path / "wf").mkdir()
    workdir = copy_workflow(tmp_path / "wf")
    home = tmp_path / "home"
    site = home / ".config" / "snakemake" / "slurm"
    site.mkdir(parents=True)
    (site / "config.yaml").write_text("executor: local\ndefault-resources:\n"
                                      "  slurm_partition: users-own\n")
    result = snakemake(workdir, "--profile", "slurm", "-n",
                       env={"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")})
    log = result.stdout + result.stderr
    assert "Using profiles slurm" in log
    assert "slurm_partition=cpu" in log and "users-own" not in log
    profile = yaml.safe_load((workdir / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    # the same folder by path
    result = snakemake(workdir, "--profile", "profiles/slurm", "-n")
    assert "slurm_partition=cpu" in result.stdout + result.stderr


def check_queue_requests(jobs):
    for job in jobs:
        args = sbatch_args(job)
        gpus = "--gpus" in args or "--gres" in args
        assert not ("--gpus" in args and "--gres" in args), (job.rule, args)
        assert gpus == (job.rule in GPU_RULES), (job.rule, args)
        assert args["-p"] == ("gpu" if job.rule in GPU_RULES else "cpu"), (job.rule, args)
        assert int(args["--mem"]) >= 1000 and int(args["-t"]) >= 5, (job.rule, args)


def test_demo_sbatch_arguments_per_rule(demo_jobs):
    check_queue_requests(demo_jobs)
    by_rule = {}
    for job in demo_jobs:
        by_rule.setdefault(job.rule, []).append(sbatch_args(job))
    assert len(by_rule["train_block"]) == 4 * 4 and len(by_rule["finalize_block"]) == 4
    assert by_rule["train_block"][0]["--gpus"] == "1"


def test_rubble_sbatch_arguments_per_rule(rubble_jobs):
    """ssim assignment: the partition job renders on the GPU partition; no finalize jobs
    (final_iterations 0); a block job asks for its images' memory and its steps' time."""
    check_queue_requests(rubble_jobs)
    rules = [job.rule for job in rubble_jobs]
    assert "finalize_block" not in rules
    assert rules.count("train_block") == 8 * 120 and rules.count("sync") == 120
    block = sbatch_args(next(j for j in rubble_jobs if j.rule == "train_block"))
    # ~414 cameras of ~1 Mpx held as uint8 (1.2 GB) over the 3 GB base: rounded up to 5 GB
    assert int(block["--mem"]) == 5000, block
    assert 10 <= int(block["-t"]) <= 30, block


def test_gres_sites_get_gres_and_never_gpus(tmp_path):
    (tmp_path / "wf").mkdir()
    workdir = copy_workflow(tmp_path / "wf")
    fake_partitioned_scene(workdir, "demo", blocks=4, train=72, test=8)
    site = workdir / "site"
    site.mkdir()
    profile = yaml.safe_load((workdir / "profiles" / "slurm" / "config.yaml").read_text())
    resources = profile["set-resources"]
    for rule in GPU_RULES:
        resources.setdefault(rule, {})["gres"] = "gpu:a100:1"
    (site / "config.yaml").write_text(yaml.safe_dump({"set-resources": resources}))
    jobs = dry_jobs(workdir, "--profile", "site")
    for job in jobs:
        args = sbatch_args(job)
        assert "--gpus" not in args, (job.rule, args)
        assert ("--gres" in args) == (job.rule in GPU_RULES), (job.rule, args)
        if job.rule in GPU_RULES:
            assert args["--gres"] == "gpu:a100:1" and args["-p"] == "gpu"


def test_mgs_plan_prints_what_the_workflow_asks_the_queue_for(demo_workdir, demo_jobs):
    """`mgs plan` and the workflow read one set of functions: the same memory and time per rule."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mgs.cli", "plan"], cwd=demo_workdir,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    rows = [dict(zip(header.split(), line.split())) for line in lines]
    planned = {row["rule"]: row for row in rows}
    checked = set()
    for job in demo_jobs:
        if job.rule in planned and "mem_mb" in job.resources:
            row = planned[job.rule]
            assert int(row["mem_mb"]) == job.resources["mem_mb"], job.rule
            assert int(row["runtime_min"]) == job.resources["runtime"], job.rule
            checked.add(job.rule)
    assert {"train_block", "finalize_block", "evaluate"} <= checked, checked
    train_jobs = sum(job.rule == "train_block" for job in demo_jobs)
    assert int(planned["train_block"]["jobs"]) == train_jobs
