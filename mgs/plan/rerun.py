"""A rerun that retrains more blocks than the user named stops before anything is queued.

`snakemake -R results/S/rounds/119/block_3.pt` on a 120-round scene reruns round 119 of block 3,
then every block's round 120 (they start from round 119's sync); when `momentum.keep_rounds`
removed round 118, Snakemake rebuilds rounds 1-118 of every block too: a thousand GPU jobs. The
workflow calls `rerun_guard` once the DAG is known and stops with its message unless the config
says `allow_full_rerun: true`.
"""

from __future__ import annotations

import os
import re
from collections import Counter

from mgs.plan.layout import RESULTS, final_block

BLOCK_RULES = ("train_block", "finalize_block")
_NAMED = re.compile(rf"{RESULTS}/(?P<scene>[^/]+)/"
                    r"(?:rounds/(?P<r>\d+)/(?:block|decoder)|final/block)_(?P<b>\d+)\.pt")


def named_blocks(forced) -> dict[tuple[str, int], int | None]:
    """(scene, block) -> round of each block checkpoint named by -R (None: its final/ file)."""
    named = {}
    for target in forced:
        match = _NAMED.fullmatch(os.path.relpath(str(target)).replace(os.sep, "/"))
        if match:
            r = int(match["r"]) if match["r"] else None
            named[(match["scene"], int(match["b"]))] = r
    return named


def one_block_target(scene: str, b: int, momentum: dict) -> str:
    """The file to -R for retraining one block's last stage and nothing else."""
    return final_block(scene, b, momentum["rounds"], momentum["final_iterations"])


def rerun_guard(jobs, forced, scenes: dict, allow: bool = False) -> str | None:
    """Why this plan retrains blocks nobody named, or None. `jobs`: (rule, wildcards) of every
    job that will run; `forced`: the -R targets; `scenes`: the config's scenes."""
    named = named_blocks(forced)
    if allow or not named:
        return None
    retrained = {(w["scene"], int(w["b"])) for rule, w in jobs if rule in BLOCK_RULES}
    extra = sorted(retrained - set(named))
    if not extra:
        return None
    scene = extra[0][0]
    counts = Counter(rule for rule, _ in jobs)
    listing = ", ".join(f"{n} {rule}" for rule, n in counts.most_common())
    momentum = scenes[scene]["momentum"]
    own = sorted(b for (s, b) in named if s == scene)
    rounds_named = [r for (s, _), r in named.items() if s == scene and r is not None]
    planned = sorted({int(w["r"]) for rule, w in jobs
                      if rule == "train_block" and w["scene"] == scene})
    redo_init = any(rule == "init" and w.get("scene") == scene for rule, w in jobs)
    if rounds_named and planned and (redo_init or planned[0] < min(rounds_named)):
        first = min(rounds_named)
        redone = "init and every round" if redo_init else f"rounds {planned[0]}-{first - 1}"
        why = (f"round {first} starts from round {first - 1}'s block checkpoints, which "
               f"momentum.keep_rounds ({momentum['keep_rounds']}) removed, so Snakemake redoes "
               f"{redone} of every block")
    else:
        why = "every later round and finalize of every block starts from the named round's sync"
    targets = " ".join(f"-R {one_block_target(scene, b, momentum)}" for b in own)
    return (f"this rerun would run {sum(counts.values())} jobs ({listing}) and retrain "
            f"block(s) {', '.join(str(b) for _, b in extra if _ == scene)} of scene {scene} "
            f"besides the one(s) named ({', '.join(map(str, own))}): {why}. To retrain only the "
            f"named block(s) use {targets}; to run all of it anyway add "
            "--config allow_full_rerun=true")


