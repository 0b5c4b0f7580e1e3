"""Checkpoints: plain dicts of tensors, written atomically, loaded with weights_only=True.

Each carries a format version and the hash of the config keys that shape it, so a checkpoint
from another run or another config is refused with a clear error instead of loading silently.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mgs.atomic import atomic_path
from mgs.errors import InputError, MgsError

FORMAT_VERSION = 1


class Checkpoint(dict):
    """A loaded checkpoint: a missing key is a clear error naming the file, not a KeyError."""

    path: Path

    def __missing__(self, key):
        raise InputError(f"checkpoint {self.path} has no {key!r} entry (damaged, or written by "
                         "another mgs version); delete it and rerun the step that writes it")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], config_hash: str) -> None:
    data = dict(payload, format_version=FORMAT_VERSION, config_hash=config_hash)
    try:
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        raise MgsError(f"cannot write checkpoint {path} ({exc}); free disk space or choose "
                       "another output folder, then rerun (the previous checkpoint, if any, is "
                       "kept)") from exc


def _writer_hint(path: Path) -> str:
    """Which step writes `path` in a run folder (mgs.blocks' layout), so the user knows what
    to run first."""
    parts, stem = path.parts, path.stem
    block = stem.removeprefix("block_").removesuffix(".partial")
    if len(parts) >= 3 and parts[-3] == "rounds" and parts[-2].isdigit():
        round_index = int(parts[-2])
        if stem == "shared":
            return ("run `mgs init` first" if round_index == 0 else
                    f"run `mgs sync --round {round_index}` first")
        if stem.startswith("block_"):
            return ("run `mgs init` first" if round_index == 0 else
                    f"run `mgs train-block --round {round_index} --block {block}` first")
    if len(parts) >= 2 and parts[-2] == "final" and stem.startswith("block_"):
        return f"run `mgs finalize-block --block {block}` first"
    return "run the step that writes it first (e.g. `mgs train`)"


def load_checkpoint(path: str | os.PathLike, config_hash: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; `config_hash=None` skips the config check."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; {_writer_hint(path)}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means an unusable file
        raise InputError(f"checkpoint {path} is unreadable or truncated ({exc.__class__.__name__}); "
                         "delete it and rerun the step that writes it") from exc
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        found = data.get("format_version") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"checkpoint {path} has format version {found}, this mgs reads "
                         f"{FORMAT_VERSION}; rerun the step that writes it")
    if config_hash is not None and data.get("config_hash") != config_hash:
        raise InputError(f"checkpoint {path} was written with a different configuration "
                         f"(hash {data.get('config_hash')} vs {config_hash}); use the config it "
                         "was made with, or delete it to start over")
    checkpoint = Checkpoint(data)
    checkpoint.path = path
    return checkpoint
