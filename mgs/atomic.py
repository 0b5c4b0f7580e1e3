"""Atomic file writes: write to a temp name in the same directory, then os.replace.

A killed process never leaves a file that looks complete under its final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

from mgs.errors import MgsError

# mkstemp creates 0600 files; outputs should get the usual permissions (shared clusters)
_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create `directory` if needed and check we can write there; clear error otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MgsError(f"cannot create output directory {directory}: {exc.strerror}; "
                       "choose a writable location") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MgsError(f"output directory {directory} is not writable; "
                       "fix its permissions or choose another location")
    return directory


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tsv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows of equal keys as a tab-separated table (floats with 6 significant digits)."""
    if not rows:
        return
    columns = list(rows[0])
    lines = ["\t".join(columns)]
    lines += ["\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])
                        for c in columns) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


def _resolved(path: str | os.PathLike) -> Path:
    # resolve() follows symlinks, so a link to the input folder counts as the input folder
    return Path(os.path.abspath(path)).resolve()


def refuse_overlap(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None],
                   what: str = "output folder", equal_only: tuple[str, ...] = ()) -> None:
    """Refuse an output that is, holds or lies inside one of `inputs` (name → path).

    Called before any work so a command never writes into, renames or deletes its inputs.
    Inputs named in `equal_only` (a run folder with its own outputs inside) and input files
    are only refused when the output is exactly them.
    """
    target = _resolved(out)
    for name, path in inputs.items():
        if path is None:
            continue
        source = _resolved(path)
        if (source.is_file() or name in equal_only) and target != source:
            continue
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        outer = out if relation == "contains" else path
        raise MgsError(f"{what} {out} {relation} the {name} {path}; writing there could "
                       "overwrite or delete your input, so nothing was done. Choose an output "
                       f"outside it, e.g. {_beside(outer)}")


def _beside(path: str | os.PathLike) -> str:
    """A sibling of `path` for the message, spelled as the user spelled `path`."""
    given = Path(path)
    if not given.name or given.name == "..":
        given = _resolved(given)
    return str(given.with_name(given.name + "-mgs")) if given.name else "another folder"


def json_text(data) -> str:
    """Strict JSON (indented, newline-terminated): NaN/inf become null, which every JSON
    reader accepts, where Python's default writes the non-standard NaN/Infinity."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
