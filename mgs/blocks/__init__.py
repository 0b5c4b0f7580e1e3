"""Momentum-GS block training as separate jobs: init, one round of one block, sync, finalize.

Run folder layout (`results/{scene}/`): `scene/`, `partition/partition.json`, `config.yaml`,
`rounds/{r}/shared.pt` (student average, teacher, block weights and metric EMAs after sync r),
`rounds/{r}/block_{b}.pt` (block b after round r: anchors, decoder, optimizer and densify state),
`rounds/{r}/decoder_{b}.pt` (the small part of it that sync reads: student, teacher, validation
metrics, loss sums, anchor count, history), `final/block_{b}.pt` (after finalize; with
final_iterations 0 there is no finalize and the last round's blocks are final).
Every job reads only files of the previous round and writes only its own outputs, atomically.

`run` is the run folder and `mgs init`, `round` one block's round (`mgs train-block`,
`mgs finalize-block`), `sync` `mgs sync`, `fit` the sync that fits the shared decoder to the
blocks' outputs, `pipeline` all of them in one process.
"""

from mgs.blocks.pipeline import train_all
from mgs.blocks.round import finalize_block, train_block
from mgs.blocks.run import Run, init_blocks
from mgs.blocks.sync import sync_round

__all__ = ["Run", "finalize_block", "init_blocks", "sync_round", "train_all", "train_block"]
