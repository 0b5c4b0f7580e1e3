"""The whole block pipeline in one process, in the workflow's job order."""

from __future__ import annotations

from pathlib import Path

from mgs.blocks.round import finalize_block, train_block
from mgs.blocks.run import Run, init_blocks
from mgs.blocks.sync import sync_round


def train_all(run: Run, model_dir: str | Path | None = None) -> None:
    """The whole block pipeline in this process (init, rounds with syncs, finalize, merge), in
    the order the workflow runs its jobs; for scripts and tests without Snakemake."""
    from mgs.merge import merge_blocks

    n = init_blocks(run)
    for r in range(1, run.momentum.rounds + 1):
        for b in range(n):
            train_block(run, r, b)
        sync_round(run, r)
    if run.momentum.final_iterations:
        for b in range(n):
            finalize_block(run, b)
    merge_blocks(run, model_dir or run.root / "model")
