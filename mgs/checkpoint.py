"""Checkpoints: plain dicts of tensors, written atomically, loaded with weights_only=True.

Each carries a format version and the hash of the config keys that shape it, so a checkpoint
from another run or another config is refused with a clear error instead of loading silently.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mgs.atomic import atomic_path
from mgs.errors import InputError

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], config_hash: str) -> None:
    data = dict(payload, format_version=FORMAT_VERSION, config_hash=config_hash)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_checkpoint(path: str | os.PathLike, config_hash: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; `config_hash=None` skips the config check."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
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
    return data
