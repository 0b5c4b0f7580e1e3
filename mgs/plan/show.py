"""`mgs plan`: every job kind's cluster request for a config, without Snakemake.

Read from the run folders where they exist (scene.json's camera counts, partition.json's blocks,
checkpoint sizes), else from the same guesses the workflow makes before they exist.
"""

from __future__ import annotations

import math
import os

from mgs.plan import layout, resources

DEFAULT_CONFIG = "config/config.yaml"


def _blocks(name: str, scene: dict) -> list:
    """Block ids from partition.json, else the grid's cells (before merging)."""
    path = layout.run_path(name, "partition", "partition.json")
    if os.path.isfile(path):
        return [int(b["id"]) for b in resources.read_json(path)["blocks"]]
    return list(range(math.prod(scene["partition"]["block_dim"])))


def plan_rows(config: dict, scenes) -> list[dict]:
    """One row per scene and rule: jobs, memory (MB), wall time (minutes), GPUs, at attempt 1."""
    rows = []
    for name in scenes:
        scene = config["scenes"][name]
        m = scene["momentum"]
        blocks = _blocks(name, scene)
        partitioned = os.path.isfile(layout.run_path(name, "partition", "partition.json"))

        def add(rule, kind, jobs, gpus, **where):
            if kind == "block" and not partitioned:  # cameras per block: an even share
                train, _ = resources.scene_counts(name)
                where["cameras"] = -(-train // max(1, len(blocks)))
            request = resources.job_request(kind, scene, name, **where)
            rows.append({"scene": name, "rule": rule, "jobs": jobs, "gpus": gpus, **request})

        if scene["partition"]["assignment"] == "ssim":
            add("coarse", "coarse", 1, 1)
            add("partition_ssim", "partition", 1, 1)
        last = blocks[-1] if blocks else 0
        add("train_block", "block", m["rounds"] * len(blocks), 1, block=last, round=m["rounds"])
        if m["final_iterations"]:
            add("finalize_block", "block", len(blocks), 1, block=last)
        add("merge", "merge", 1, 0,
            inputs=[layout.final_block(name, b, m["rounds"], m["final_iterations"])
                    for b in blocks])
        model = [layout.run_path(name, "model", "splats.ply")]
        add("evaluate", "evaluate", 1, 1, inputs=model)
        add("export", "evaluate", 1, 1, inputs=model)
    return rows


def _run(args) -> None:
    import pandas as pd

    from mgs.plan.config import load_workflow_config

    config, selected = load_workflow_config(DEFAULT_CONFIG, args.configfile)
    scenes = args.scene or selected
    unknown = [s for s in scenes if s not in config["scenes"]]
    if unknown:
        from mgs.errors import InputError

        raise InputError(f"scene(s) {', '.join(unknown)} not in the config (configured: "
                         f"{', '.join(sorted(config['scenes']))}); name one of those")
    table = pd.DataFrame(plan_rows(config, scenes))
    table = table.rename(columns={"runtime": "runtime_min"})
    print(table.to_string(index=False))


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="print each job's cluster request (memory, time, GPUs) for "
                                    "a config, without Snakemake; run from the repository root")
    p.add_argument("--configfile", nargs="*", default=[],
                   help=f"config files merged over {DEFAULT_CONFIG}, as Snakemake's --configfile "
                        "(their scenes are the ones shown)")
    p.add_argument("--scene", nargs="*", help="only these scenes")
    p.set_defaults(func=_run)
