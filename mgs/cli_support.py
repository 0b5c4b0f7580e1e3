"""The command line's plumbing: option types, input/output checks, errors and signals.

User errors (MgsError) print one message and exit with status 2; bugs print one line (exit 1)
unless --debug or MGS_DEBUG=1 asks for the traceback. SIGTERM stops training after the current
step with a checkpoint (exit 143).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from mgs.errors import MgsError, StopRequested


def bool_arg(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def count_arg(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def apply_overrides(values: dict, args, keys, section: str) -> None:
    """Command-line options over the YAML values, each checked under its own flag's name."""
    from mgs.validate import SPECS, check_value

    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            spec = SPECS[section].get(key)
            flag = "--" + key.replace("_", "-")
            values[key] = check_value(value, spec, flag) if spec else value


def run_inputs(root: Path, config: str | None) -> dict:
    """The parts of a run folder that later steps read: outputs must stay out of them."""
    inputs = {"run folder": root, "config file": config}
    inputs.update({f"run's {name} folder": root / name
                   for name in ("scene", "partition", "rounds", "final")})
    return inputs


def _sigterm_cause() -> str:
    """What the log of a job stopped by SIGTERM says about why: SLURM sends it at the time limit
    (and on scancel, preemption, some memory kills); where the job's end time is known
    (SLURM_JOB_END_TIME) a SIGTERM within 3 minutes of it is the time limit. A retry reads this
    line (mgs.plan.resources.ran_out) to grow the right request."""
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and time.time() >= int(end) - 180:
        return "SIGTERM at the job's time limit"
    return "SIGTERM before the job's time limit" if end.isdigit() else "SIGTERM"


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (scancel, job limits): a training loop stops after its step with a checkpoint;
    anything else stops at once, like Ctrl-C."""
    print(f"mgs: {_sigterm_cause()}", file=sys.stderr, flush=True)
    loop = sys.modules.get("mgs.training_loop")
    if loop is not None and loop.StopSignal.active and not loop.StopSignal.requested:
        loop.StopSignal.requested = True
        return
    raise KeyboardInterrupt


def _new_folders(args) -> list[Path]:
    """Output folders this command would create (removed again, if left empty, on failure)."""
    out = getattr(args, "out", None)
    if not out or args.verb == "configure":
        return []
    path = Path(out).absolute()
    while not path.parent.exists():
        path = path.parent
    return [] if path.exists() else [path]


def _remove_empty(folder: Path) -> None:
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()  # only empty folders: never anything the run did write
    with contextlib.suppress(OSError):
        folder.rmdir()


def run_command(args, debug: bool) -> int:
    """Run the verb; every failure becomes one message and an exit status."""
    if "mgs.training_loop" in sys.modules:
        sys.modules["mgs.training_loop"].StopSignal.requested = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    fresh, code = _new_folders(args), 1
    try:
        args.func(args)
        code = 0
    except StopRequested as exc:
        print(f"mgs {args.verb}: {exc}", file=sys.stderr)
        code = 128 + signal.SIGTERM
    except MgsError as exc:
        if debug:
            traceback.print_exc()
        print(f"mgs {args.verb}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"mgs {args.verb}: interrupted", file=sys.stderr)
        code = 130
    except OSError as exc:  # full disk, permissions: the system's words and the file
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mgs {args.verb}: error: {where}{exc.strerror or exc}; free space or fix the "
              "permissions, then rerun (--debug shows the traceback)", file=sys.stderr)
        code = 2
    except Exception as exc:  # a bug: one line by default, the traceback on request
        if debug:
            raise
        print(f"mgs {args.verb}: internal error: {exc.__class__.__name__}: {exc} (rerun with "
              "--debug or MGS_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if code != 0:
            for folder in fresh:
                _remove_empty(folder)
    return code
