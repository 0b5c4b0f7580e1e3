"""Start-up cost of the per-block jobs: import memory and time, and a 1-step `mgs train-block`.

    python benchmarks/bench_startup.py                       # this source tree
    python benchmarks/bench_startup.py main .                # side by side, same run, interleaved

A tree is a folder, or a git revision of this repository (exported to a temporary folder).

Every measurement runs in a fresh process with PYTHONPATH=TREE (so `mgs` comes from that tree):

- imports: `import mgs.cli` + build_parser (what every verb pays), `mgs train-block --help`, and
  the modules a block job loads (mgs.blocks) - peak RSS (ru_maxrss) and wall time, plus which of
  the heavy optional libraries ended up imported;
- a block job: `mgs train-block` of one round of 1 step on a demo-sized synthetic run
  (80 views of 200x150, 2 blocks), rounds 1 and 2 (round 2 may reuse what round 1 cached),
  and `mgs sync` - wall time and peak RSS. Each tree trains its own copy of one initialised run.

Times are medians over --repeats; trees alternate within each repeat, so a busy machine slows
both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HEAVY = ("torch", "numba", "PIL", "pycolmap", "matplotlib", "skimage", "pandas", "scipy",
         "rich.table", "lpips", "torchvision")
THIS_TREE = Path(__file__).resolve().parents[1]
NEUTRAL = THIS_TREE  # working folder of the child processes (set in main)

# one child process: run `code`, print peak RSS (MiB), wall seconds and the heavy modules loaded
PROBE = """
import resource, sys, time
start = time.perf_counter()
{code}
seconds = time.perf_counter() - start
import json
print(json.dumps({{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "s": seconds, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""
IMPORTS = {
    "import mgs.cli + parser": "import mgs.cli; mgs.cli.build_parser()",
    "train-block --help": ("import mgs.cli\ntry:\n    mgs.cli.main(['train-block', '--help'])\n"
                           "except SystemExit:\n    pass"),
    "import mgs.blocks": "import mgs.cli; import mgs.blocks",
}
TRAIN = dict(iterations=10, lr_max_steps=10, eval_interval=1000, checkpoint_interval=1000,
             threads=1)
MOMENTUM = dict(mode="full", rounds=2, iterations_per_round=1, final_iterations=0)


def export(tree: str, tmp: Path) -> Path:
    """A source folder as given, or a git revision's files exported to `tmp`."""
    if Path(tree).is_dir():
        return Path(tree).resolve()
    out = tmp / f"rev_{tree.replace('/', '_')}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(THIS_TREE), "archive", tree], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def env_for(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
            "MGS_DEVICE": "cpu"}


def probe(tree: Path, code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)],
                          env=env_for(tree), capture_output=True, text=True, check=True,
                          cwd=NEUTRAL)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed_job(tree: Path, args: list[str]) -> dict:
    """Wall time and peak RSS of one `mgs` command in a child process."""
    code = ("import resource, subprocess, sys, time, json\n"
            "start = time.perf_counter()\n"
            f"subprocess.run([sys.executable, '-m', 'mgs.cli', *{args!r}], check=True,\n"
            "               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(json.dumps({'s': time.perf_counter() - start, "
            "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env_for(tree), capture_output=True,
                          text=True, check=True, cwd=NEUTRAL)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_run(root: Path) -> None:
    """A demo-sized run through init, made with this tree's code."""
    import yaml

    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"train": TRAIN, "momentum": MOMENTUM}))
    steps = [["synth", str(root / "scene"), "--seed", "0"],
             ["partition", "--scene", str(root / "scene"), "--out", str(root / "partition"),
              "--block-dim", "2", "1", "1", "--assignment", "center"],
             ["init", "--run", str(root)]]
    for args in steps:
        subprocess.run([sys.executable, "-m", "mgs.cli", *args], env=env_for(THIS_TREE),
                       check=True, cwd=NEUTRAL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def block_jobs(tree: Path, run: Path) -> dict[str, dict]:
    """Rounds 1 and 2 of block 0 (one step each) and the sync between them, on a fresh copy.
    Block 1 goes first, so block 0 finds the compiled kernels in numba's cache."""
    results = {}
    for r in (1, 2):
        for b in (1, 0) if r == 1 else (0,):
            result = timed_job(tree, ["train-block", "--run", str(run), "--round", str(r),
                                      "--block", str(b)])
            if b == 0:
                results[f"train-block round {r}"] = result
        if r == 1:
            results["sync"] = timed_job(tree, ["sync", "--run", str(run), "--round", "1"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*",
                        help="source folders or git revisions (default: this folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    global NEUTRAL
    samples: dict[tuple[str, Path], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_startup.") as tmp:
        # children start here: python puts its working folder first on sys.path
        NEUTRAL = Path(tmp)
        trees = [export(t, Path(tmp)) for t in args.trees] or [THIS_TREE]
        labels_of = dict(zip(trees, args.trees or ["."]))
        base = Path(tmp) / "run"
        make_run(base)
        for repeat in range(args.repeats):
            for tree in trees if repeat % 2 == 0 else trees[::-1]:
                for label, code in IMPORTS.items():
                    samples.setdefault((label, tree), []).append(probe(tree, code))
                run = Path(tmp) / f"run_{repeat}_{trees.index(tree)}"
                shutil.copytree(base, run, symlinks=True)
                for label, result in block_jobs(tree, run).items():
                    samples.setdefault((label, tree), []).append(result)
                shutil.rmtree(run)
    names = [f"[{i}] {labels_of[t]}" for i, t in enumerate(trees)]
    print("\n".join(names))
    print(f"medians of {args.repeats}; RSS = peak resident memory of the process (MiB)")
    header = f"{'measurement':<26}" + "".join(f"{f'[{i}] s':>9}{f'[{i}] MiB':>10}"
                                              for i in range(len(trees)))
    print(header + "\n" + "-" * len(header))
    labels = list(dict.fromkeys(label for label, _ in samples))
    for label in labels:
        line = f"{label:<26}"
        for tree in trees:
            rows = samples[(label, tree)]
            line += f"{statistics.median(r['s'] for r in rows):9.2f}"
            line += f"{statistics.median(r['rss'] for r in rows):10.0f}"
        print(line)
    print("\nheavy modules loaded:")
    for label in IMPORTS:
        for i, tree in enumerate(trees):
            print(f"  [{i}] {label:<24} {', '.join(samples[(label, tree)][0]['heavy']) or '-'}")


if __name__ == "__main__":
    main()
