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
    path = layout.run_file("partition", name)
    if os.path.isfile(path):
        return [int(b["id"]) for b in layout.read_json(path)["blocks"]]
    return list(range(math.prod(scene["partition"]["block_dim"])))


def plan_rows(config: dict, scenes) -> list[dict]:
    """One row per scene and GPU-or-heavy rule: jobs, host memory (MB), wall time (minutes),
    GPUs and estimated GPU memory (MB), at attempt 1."""
    rows = []
    for name in scenes:
        scene = config["scenes"][name]
        m = scene["momentum"]
        blocks = _blocks(name, scene)
        partitioned = os.path.isfile(layout.run_file("partition", name))
        limit = (scene.get("cluster") or {}).get("gpu_mem_mb")

        def add(rule, jobs, gpus, **where):
            if rule in ("train_block", "finalize_block") and not partitioned:
                train, _ = resources.scene_counts(name)  # cameras per block: an even share
                where["cameras"] = -(-train // max(1, len(blocks)))
            request = resources.job_request(rule, scene, name, **where)
            gpu_mb = request["gpu_mem_mb"] if gpus else 0
            rows.append({"scene": name, "rule": rule, "jobs": jobs, "gpus": gpus,
                         "mem_mb": request["mem_mb"], "runtime_min": request["runtime"],
                         "gpu_mem_mb": gpu_mb,
                         "fits": "?" if not limit or not gpus else
                                 ("yes" if gpu_mb <= limit else "NO")})

        if scene["partition"]["assignment"] == "ssim":
            add("coarse", 1, 1)
            add("partition_ssim", 1, 1)
        last = blocks[-1] if blocks else 0
        add("train_block", m["rounds"] * len(blocks), 1, block=last, round=m["rounds"])
        if m["final_iterations"]:
            add("finalize_block", len(blocks), 1, block=last)
        add("merge", 1, 1, inputs=[layout.final_block(name, b, m["rounds"], m["final_iterations"])
                                   for b in blocks])
        model = [layout.run_file("splats", name)]
        add("evaluate", 1, 1, inputs=model)
        add("export", 1, 1, inputs=model)
    return rows


LOCAL_RULES = {"configure", "sync", "all"}  # run on the submit host: no queue wait


def chain(scene: dict, blocks: int) -> dict:
    """Cluster submissions of a scene and its longest chain of dependent jobs (each queued job
    on it waits in the queue once); with cluster.rounds_per_job K, K rounds are one group job."""
    m, ssim = scene["momentum"], scene["partition"]["assignment"] == "ssim"
    per_job = scene.get("cluster", {}).get("rounds_per_job", 1)
    path = ["configure", "scene"] + (["coarse", "partition_ssim"] if ssim else ["partition"])
    if per_job > 1:
        rounds = ["round_set"] * -(-m["rounds"] // per_job)
        submitted = len(rounds)
    else:
        rounds = ["train_block", "sync"] * m["rounds"]
        submitted = m["rounds"] * (blocks + 1)
    path += ["init"] + rounds
    path += (["finalize_block"] if m["final_iterations"] else []) + ["merge", "evaluate", "report"]
    jobs = len(path) - len(rounds) + submitted + 1  # + export
    jobs += (blocks - 1) if m["final_iterations"] else 0
    return {"jobs": jobs, "chain": len(path),
            "queued_on_chain": sum(rule not in LOCAL_RULES for rule in path)}


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
    print(table.to_string(index=False))
    for name in scenes:
        counts = chain(config["scenes"][name], len(_blocks(name, config["scenes"][name])))
        print(f"{name}: {counts['jobs']} jobs (a group job counted once); the longest chain has "
              f"{counts['chain']} jobs, {counts['queued_on_chain']} of them queued (one queue "
              "wait each)")
    print("gpu_mem_mb: estimated (images as uint8 on the GPU, the block's state, render buffers); "
          "fits: against the scene's cluster.gpu_mem_mb (? where unset)")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="print each job's cluster request (memory, time, GPUs) for "
                                    "a config, without Snakemake; run from the repository root")
    p.add_argument("--configfile", nargs="*", default=[],
                   help=f"config files merged over {DEFAULT_CONFIG}, as Snakemake's --configfile "
                        "(their scenes are the ones shown)")
    p.add_argument("--scene", nargs="*", help="only these scenes")
    p.set_defaults(func=_run)
