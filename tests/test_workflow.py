"""The Snakemake workflow: config checks, and real runs of the CI-sized scene (config/ci.yaml) in a
temporary copy of the workflow: a whole run, a partial rerun of one block, and a run killed while
a block trains then resumed with --rerun-incomplete."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mgs.checkpoint import load_checkpoint
from mgs.config import ExportConfig, TrainConfig
from mgs.momentum import MomentumConfig
from mgs.partition import PartitionConfig
from mgs.ingest.sfm import SfmConfig
from mgs.synthetic import SyntheticConfig

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
WORKFLOW_FILES = ("workflow", "config", "profiles", "envs", "slurm", ".test")
SECTIONS = {"synthetic": SyntheticConfig, "sfm": SfmConfig, "partition": PartitionConfig,
            "train": TrainConfig, "momentum": MomentumConfig, "export": ExportConfig}
SCENE = "ci"
RUN = Path("results") / SCENE


def copy_workflow(dest: Path) -> Path:
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_symlink():  # ./slurm -> profiles/slurm
            os.symlink(os.readlink(source), dest / name)
        else:
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, dest / name)
    return dest


def snakemake_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def job_env() -> dict[str, str]:
    """The jobs call `mgs`: the interpreter's bin folder goes first on PATH."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def snakemake(workdir: Path, *args: str, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(snakemake_command(*args), cwd=workdir, env={**job_env(), **(env or {})},
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


def snapshot(root: Path, pattern: str) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every file matching `pattern` under `root`."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.glob(pattern)) if p.is_file()}


# ------------------------------------------------------------------ schema


def schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_matches_dataclass_fields_and_defaults(section):
    """Every dataclass field is in the schema with the same default, and nothing else is."""
    properties = schema()["$defs"][section]["properties"]
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    assert set(properties) == set(fields), (
        f"schema section {section!r} vs {SECTIONS[section].__name__}: "
        f"only in schema {sorted(set(properties) - set(fields))}, "
        f"only in dataclass {sorted(set(fields) - set(properties))}")
    for name, field in fields.items():
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert properties[name].get("default") == default, f"{section}.{name} default"
        assert properties[name].get("description"), f"{section}.{name} is undocumented"


def test_schema_validates_the_shipped_configs():
    from snakemake.utils import validate

    for path in [REPO / "config" / "config.yaml", REPO / "config" / "ci.yaml"]:
        config = yaml.safe_load(path.read_text())
        validate(config, str(SCHEMA))
        scene = next(iter(config["scenes"].values()))
        assert scene["train"]["feat_dim"] == 32  # defaults were filled in


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "config" / "scenes").glob("*.yaml")))
def test_schema_validates_paper_presets(preset):
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config" / "scenes" / preset).read_text())
    validate(config, str(SCHEMA))


BAD_CONFIGS = {
    "unknown key": ({"train": {"iteratons": 10}}, ["scenes.ci.train", "iteratons"]),
    "negative rounds": ({"momentum": {"rounds": -1}}, ["scenes.ci.momentum.rounds", "-1"]),
    "block_dim of length 2": ({"partition": {"block_dim": [2, 2]}},
                              ["scenes.ci.partition.block_dim", "too short"]),
    "unknown scene key": ({"matching": "exhaustive"}, ["scenes.ci", "matching"]),
    # jsonschema's minimum lets NaN through: mgs.validate catches it, as the verbs do
    "NaN sigma": ({"momentum": {"sigma": float("nan")}}, ["scenes.ci: momentum.sigma", "(0, inf)"]),
    "NaN learning rate": ({"train": {"feature_lr": float("nan")}}, ["train.feature_lr", "nan"]),
}


@pytest.fixture(scope="module")
def dry_workflow(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("dry"))


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_errors_are_rejected_before_any_job(dry_workflow, case):
    override, expected = BAD_CONFIGS[case]
    config = yaml.safe_load((dry_workflow / "config" / "ci.yaml").read_text())
    scene = config["scenes"][SCENE]
    for key, value in override.items():
        if isinstance(value, dict):
            scene.setdefault(key, {}).update(value)
        else:
            scene[key] = value
    bad = dry_workflow / f"bad-{case.replace(' ', '-')}.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = snakemake(dry_workflow, "--dry-run", f"--configfile={bad}", check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message[-2000:]}"
    assert not (dry_workflow / "results").exists()


def test_dry_run_of_the_demo_plans_its_jobs(dry_workflow):
    result = snakemake(dry_workflow, "--dry-run", "--cores", "2")
    out = result.stdout + result.stderr
    for rule in ("configure", "scene_synthetic", "partition", "evaluate", "report"):
        assert rule in out
    # the block jobs appear once the partition checkpoint has run
    assert "checkpoint" in out


def test_catalog_layout_runs_from_the_root_and_on_the_test_config(dry_workflow):
    """workflow/Snakefile is found from the repository root; `--directory .test` plans the CI
    scene (the Snakemake workflow catalog's test layout) with its results inside .test/."""
    assert not (dry_workflow / "Snakefile").exists()
    result = snakemake(dry_workflow, "--dry-run", "--cores", "2", "--directory", ".test")
    out = result.stdout + result.stderr
    assert "workflow/Snakefile" in out and "results/ci/scene/scene.json" in out
    assert "results/demo" not in out


def _scene_override(workdir: Path, name: str, top: dict | None = None, **train) -> str:
    config = yaml.safe_load((workdir / "config" / "ci.yaml").read_text())
    config["scenes"][SCENE].setdefault("train", {}).update(train)
    config.update(top or {})
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return f"--configfile={path}"


def test_gsplat_build_comes_before_gpu_jobs_only_where_gsplat_may_render(dry_workflow):
    planned = snakemake(dry_workflow, "--dry-run", "--printshellcmds", configfile(dry_workflow))
    out = planned.stdout
    assert "rule gsplat_build:" in out
    evaluate = out[out.index("rule evaluate:"):]
    assert "results/.torch_extensions/gsplat_build.json" in evaluate.split("output:")[0]
    for name, override, top in (("cpu", {"device": "cpu"}, None),
                                ("torch", {"backend": "torch"}, None),
                                ("off", {}, {"gsplat": {"build": False}})):
        args = _scene_override(dry_workflow, f"gsplat-{name}", top, **override)
        result = snakemake(dry_workflow, "--dry-run", args)
        assert "gsplat_build" not in result.stdout, name
    bad = _scene_override(dry_workflow, "gsplat-bad", {"gsplat": {"arch_list": "sm_90"}})
    result = snakemake(dry_workflow, "--dry-run", bad, check=False)
    assert result.returncode != 0 and "gsplat.arch_list" in result.stdout + result.stderr


# ------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """The CI scene run to completion once; the tests below rerun parts of it. Every `mgs` job
    records the files it opened for reading in READS (tests/read_trace/sitecustomize.py)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("wf"))
    reads = workdir / READS
    reads.mkdir()
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "read_trace"),
                                       os.environ.get("PYTHONPATH")) if p)
    snakemake(workdir, "--cores", "2", f"--configfile={workdir / 'config' / 'ci.yaml'}",
              env={"MGS_READ_TRACE": str(reads), "PYTHONPATH": path})
    return workdir


READS = Path(".reads")  # inside the CI run's folder


def planned_jobs(workdir: Path, *args: str) -> list[dict]:
    """Every job of a dry run: rule, inputs, outputs and shell command."""
    result = snakemake(workdir, "--dry-run", "--printshellcmds", *args)
    jobs = []
    for line in (result.stdout + result.stderr).splitlines():
        match = re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line.strip())
        if match and not line.startswith(" "):
            jobs.append({"rule": match.group(1), "input": [], "output": [], "shell": ""})
        elif jobs and line.startswith("    input: "):
            jobs[-1]["input"] = line.split(": ", 1)[1].split(", ")
        elif jobs and line.startswith("    output: "):
            jobs[-1]["output"] = [o.split(" (")[0] for o in line.split(": ", 1)[1].split(", ")]
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.split(": ", 1)[1]
    return jobs


def configfile(workdir: Path) -> str:
    return f"--configfile={workdir / 'config' / 'ci.yaml'}"


@pytest.mark.slow
def test_gsplat_build_job_records_a_cpu_run_and_sets_the_job_environment(ci_run):
    import json

    record = json.loads((ci_run / "results" / ".torch_extensions" / "gsplat_build.json").read_text())
    assert record["built"] is False and "no CUDA GPU" in record["reason"]
    # the variables every job inherits from the workflow: one build folder, one arch list
    expected = ci_run / "results" / ".torch_extensions"
    assert os.path.realpath(record["extensions_dir"]) == os.path.realpath(expected)
    assert record["arch_list"] == "8.0;8.6;8.9;9.0+PTX"


@pytest.mark.slow
def test_full_run_writes_every_stage(ci_run):
    run = ci_run / RUN
    for path in ["config.yaml", "scene/scene.json", "partition/partition.json",
                 "rounds/2/shared.pt", "rounds/2/sync.tsv", "model/decoder.pt",
                 "model/anchors.ply", "model/splats.ply", "eval/metrics.json",
                 "eval/per_view.csv"]:
        assert (run / path).is_file(), path
    blocks = sorted((run / "final").glob("block_*.pt"))
    assert len(blocks) == 4
    for path in blocks + sorted((run / "rounds").glob("*/block_*.pt")):
        load_checkpoint(path)  # complete and readable
    assert not list(run.rglob("*.partial.pt"))
    assert (ci_run / "results" / "report" / "report.html").is_file()
    # every rule left a benchmark and a log
    assert len(list((run / "benchmarks").rglob("*.tsv"))) >= 20
    # nothing left to do, and an unchanged config rewrites nothing
    before = (run / "config.yaml").stat().st_mtime_ns
    result = snakemake(ci_run, "--dry-run", configfile(ci_run))
    assert "Nothing to be done" in result.stdout + result.stderr
    assert (run / "config.yaml").stat().st_mtime_ns == before


def _runs(shell: str, args: list[str]) -> bool:
    """Whether a job's shell command is `mgs ARGS` (after any VAR=value, before redirections)."""
    words = shlex.split(shell)
    if "mgs" not in words:
        return False
    start = words.index("mgs") + 1
    return words[start:start + len(args)] == args and (
        len(words) == start + len(args) or words[start + len(args)] in (">", "2>&1"))


def _product(path: str) -> str:
    """A file of the scene or eval folder stands for the file that declares that folder."""
    for folder, product in (("scene", "scene.json"), ("eval", "metrics.json")):
        if path.startswith(f"{RUN}/{folder}/"):
            return f"{RUN}/{folder}/{product}"
    return path


@pytest.mark.slow
def test_every_job_reads_only_what_its_rule_declares(ci_run):
    """What each `mgs` job of the CI run opened (under the run folder) is among its rule's
    declared inputs, so Snakemake orders and reruns it right; and every declared input is read.
    The scene and eval folders count as their scene.json and metrics.json, a directory input as
    its files; what a job wrote itself and read back is not a read."""
    # the jobs up to the partition checkpoint, then those after it (forcing everything would
    # force the checkpoint too and leave the later jobs unknown to a dry run)
    jobs = planned_jobs(ci_run, "--forceall", configfile(ci_run), "--until", "partition")
    jobs += planned_jobs(ci_run, configfile(ci_run), "--forcerun", "gsplat_build", "init",
                         "train_block", "sync", "finalize_block", "merge", "evaluate", "export",
                         "report")
    undeclared, unread = {}, {}
    for trace in sorted((ci_run / READS).glob("*.tsv")):
        argv, *reads = trace.read_text().splitlines()
        args = shlex.split(argv)[1:]
        if args == ["preflight"]:  # the workflow's own check before any job: reads no run file
            continue
        job = next((j for j in jobs if _runs(j["shell"], args)), None)
        assert job is not None, f"no planned job runs `mgs {' '.join(args)}`"
        inputs = {_product(i) for i in job["input"]}
        covered = set()
        for path in reads:
            rel = os.path.relpath(path, ci_run)
            if not rel.startswith(str(RUN)) or rel.startswith(tuple(
                    f"{RUN}/{d}/" for d in ("logs", "benchmarks", "cache"))):
                continue
            if rel in job["output"] or rel.endswith(".partial.pt"):
                continue  # its own outputs (configure compares; resume reads its partial file)
            rel = _product(rel)
            owner = next((i for i in inputs if rel == i or rel.startswith(i + "/")), None)
            if owner is None:
                undeclared.setdefault(job["rule"], set()).add(rel)
            else:
                covered.add(owner)
        markers = {i for i in inputs if i.endswith("gsplat_build.json")}  # an order, not a read
        missing = {i for i in inputs - covered - markers if i.startswith(str(RUN))}
        if missing:
            unread.setdefault(job["rule"], set()).update(missing)
    assert undeclared == {}, "read but not declared"
    assert unread == {}, "declared but never read"


@pytest.mark.slow
def test_rerun_of_one_block_touches_only_that_block(ci_run):
    run = ci_run / RUN
    untouched = {**snapshot(run, "rounds/**/*"), **snapshot(run, "final/block_[013].pt"),
                 **snapshot(run, "scene/**/*"), **snapshot(run, "partition/*")}
    rewritten = snapshot(run, "final/block_2.pt") | snapshot(run, "model/*") \
        | snapshot(run, "eval/metrics.json")
    report = snapshot(ci_run, "results/report/report.html")
    time.sleep(0.01)
    result = snakemake(ci_run, "--cores", "2", configfile(ci_run), "-R", str(RUN / "final/block_2.pt"))
    log = result.stdout + result.stderr
    assert "rule finalize_block" in log and "train_block" not in log and "rule sync" not in log
    assert {**snapshot(run, "rounds/**/*"), **snapshot(run, "final/block_[013].pt"),
            **snapshot(run, "scene/**/*"), **snapshot(run, "partition/*")} == untouched
    after = snapshot(run, "final/block_2.pt") | snapshot(run, "model/*") \
        | snapshot(run, "eval/metrics.json")
    for path, (mtime, _) in rewritten.items():
        assert after[path][0] > mtime, f"{path} was not rewritten"
    assert snapshot(ci_run, "results/report/report.html") != report


@pytest.fixture
def ci_copy(ci_run, tmp_path):
    """A copy of the finished CI run (results and Snakemake's records) to change freely."""
    copy = tmp_path / "wf"
    shutil.copytree(ci_run, copy, symlinks=True, ignore=shutil.ignore_patterns(str(READS)))
    return copy


@pytest.mark.slow
def test_a_rerun_that_would_retrain_other_blocks_stops_before_any_job(ci_copy):
    run = ci_copy / RUN
    before = snapshot(run, "rounds/**/*") | snapshot(run, "final/*")
    result = snakemake(ci_copy, "--cores", "2", configfile(ci_copy),
                       "-R", str(RUN / "rounds/1/block_0.pt"), check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "would run" in log and "block(s) 1, 2, 3 of scene ci" in log, log[-3000:]
    assert "--config allow_full_rerun=true" in log
    assert f"-R {RUN}/final/block_0.pt" in log
    assert snapshot(run, "rounds/**/*") | snapshot(run, "final/*") == before


@pytest.mark.slow
def test_a_rerun_of_the_last_round_without_finalize_rebuilds_sync_then_merge(ci_copy):
    """With final_iterations 0 merge reads the last round's blocks and shared decoder: -R of one
    block's last round reruns that block, the sync, then merge with the new decoder."""
    no_final = ci_copy / "config" / "no_final.yaml"
    config = yaml.safe_load((ci_copy / "config" / "ci.yaml").read_text())
    config["scenes"][SCENE]["momentum"]["final_iterations"] = 0
    no_final.write_text(yaml.safe_dump(config))
    target = str(RUN / "model" / "decoder.pt")
    snakemake(ci_copy, "--cores", "2", f"--configfile={no_final}", target)
    run = ci_copy / RUN
    rerun = [f"--configfile={no_final}", target, "-R", str(RUN / "rounds/2/block_1.pt")]
    jobs = planned_jobs(ci_copy, *rerun)  # the target before -R, which takes every word after it
    assert sorted(j["rule"] for j in jobs) == ["merge", "sync", "train_block"]
    snakemake(ci_copy, "--cores", "2", *rerun)
    shared = load_checkpoint(run / "rounds" / "2" / "shared.pt")
    decoder = load_checkpoint(run / "model" / "decoder.pt")["decoders"][0]
    student = shared["student"]
    assert student.keys() == decoder.keys()
    assert all(torch.equal(student[k], decoder[k]) for k in student)
    result = snakemake(ci_copy, "--dry-run", f"--configfile={no_final}", target)
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_a_new_export_section_reruns_the_merge_and_no_block(ci_copy):
    from mgs.merge import read_splats

    run = ci_copy / RUN
    blocks = snapshot(run, "rounds/**/*") | snapshot(run, "final/*")
    degree0 = ci_copy / "config" / "degree0.yaml"
    config = yaml.safe_load((ci_copy / "config" / "ci.yaml").read_text())
    config["scenes"][SCENE]["export"] = {"sh_degree": 0, "refine_steps": 0}
    degree0.write_text(yaml.safe_dump(config))
    target = str(RUN / "model" / "splats.ply")
    snakemake(ci_copy, "--cores", "1", f"--configfile={degree0}", str(RUN / "config.yaml"))
    jobs = planned_jobs(ci_copy, f"--configfile={degree0}", target)
    assert [j["rule"] for j in jobs] == ["merge"]
    snakemake(ci_copy, "--cores", "2", f"--configfile={degree0}", target)
    assert read_splats(run / "model" / "splats.ply")["sh"].shape[1] == 1  # degree 0: f_dc only
    assert snapshot(run, "rounds/**/*") | snapshot(run, "final/*") == blocks


@pytest.mark.slow
def test_killed_run_resumes_with_rerun_incomplete(ci_run):
    """A run killed (SIGKILL to snakemake's process group) while a block trains round 2; the next
    run with --rerun-incomplete redoes that job from its in-job checkpoint and what follows it,
    nothing that had finished."""
    run = ci_run / RUN
    # back to the state of a first run that got as far as round 1
    for path in ["rounds/2", "final", "model", "eval"]:
        shutil.rmtree(run / path)
    shutil.rmtree(ci_run / "results" / "report")
    earlier = {**snapshot(run, "rounds/0/*"), **snapshot(run, "rounds/1/*")}
    process = subprocess.Popen(snakemake_command("--cores", "1", configfile(ci_run)),
                               cwd=ci_run, env=job_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((run / "rounds" / "2").glob("block_*.partial.pt")):
            assert process.poll() is None, "snakemake ended before a block job checkpointed"
            assert time.monotonic() < deadline, "no in-job checkpoint within 240 s"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    killed = [p.name.replace(".partial", "") for p in (run / "rounds" / "2").glob("*.partial.pt")]
    assert killed
    for name in killed:  # killed before its atomic write: nothing that looks complete
        assert not (run / "rounds" / "2" / name).exists()
    finished = {k: v for k, v in snapshot(run, "rounds/2/block_*.pt").items() if ".partial" not in k}

    snakemake(ci_run, "--unlock", configfile(ci_run))  # the killed run's lock
    result = snakemake(ci_run, "--cores", "2", "--rerun-incomplete", configfile(ci_run))
    log = result.stdout + result.stderr
    assert log.count("rule train_block:") == 4 - len(finished)  # only round 2's unfinished blocks
    for name in killed:
        block_log = run / "logs" / "train_block" / "round_2" / name.replace(".pt", ".log")
        assert f"resuming {name}" in block_log.read_text()
    assert {**snapshot(run, "rounds/0/*"), **snapshot(run, "rounds/1/*")} == earlier
    assert {k: v for k, v in snapshot(run, "rounds/2/block_*.pt").items() if k in finished} \
        == finished
    assert not list(run.rglob("*.partial.pt"))
    for path in sorted((run / "final").glob("block_*.pt")) + sorted(run.glob("rounds/2/*.pt")):
        load_checkpoint(path)
    assert (run / "eval" / "metrics.json").is_file()
    assert (ci_run / "results" / "report" / "report.html").is_file()
    result = snakemake(ci_run, "--dry-run", configfile(ci_run))
    assert "Nothing to be done" in result.stdout + result.stderr


def test_configure_writes_a_flat_config_only_when_it_changes(tmp_path):
    from mgs.cli import main

    workflow_config = tmp_path / "workflow.yaml"
    workflow_config.write_text(yaml.safe_dump({"scenes": {"x": {
        "partition": {"block_dim": [2, 1, 1], "margin": float("inf")},
        "momentum": {"rounds": 3}}}}))
    out = tmp_path / "run" / "config.yaml"
    assert main(["configure", "--config", str(workflow_config), "--scene", "x",
                 "--out", str(out)]) == 0
    flat = yaml.safe_load(out.read_text())
    assert set(flat) == {"scene", "synthetic", "sfm", "partition", "train", "momentum", "export",
                         "paper"}
    assert flat["momentum"]["rounds"] == 3 and flat["train"]["feat_dim"] == 32
    assert flat["partition"]["margin"] == float("inf")
    before = out.stat().st_mtime_ns
    time.sleep(0.01)
    assert main(["configure", "--config", str(workflow_config), "--scene", "x",
                 "--out", str(out)]) == 0
    assert out.stat().st_mtime_ns == before  # same content: not rewritten
    # the dataclasses' own checks run too (ssim assignment needs a coarse model)
    assert main(["configure", "--settings", '{"partition": {"assignment": "ssim"}}',
                 "--out", str(tmp_path / "bad.yaml")]) == 2
    assert not (tmp_path / "bad.yaml").exists()
