"""Records every file an `mgs` process opens for reading and did not write itself, when
MGS_READ_TRACE names a folder: one file per process (its command line, then one path per line).
Put this folder on PYTHONPATH; tests/test_workflow.py compares what each job read with what its
rule declares."""

import os
import shlex
import sys

_FOLDER = os.environ.get("MGS_READ_TRACE")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT


def _final_name(path: str) -> str:
    """mgs.atomic writes `.NAME.<random>.tmp<suffix>` beside NAME, then renames it."""
    folder, base = os.path.split(path)
    if not base.startswith(".") or ".tmp" not in base:
        return path
    return os.path.join(folder, base[1:base.rindex(".tmp")].rsplit(".", 1)[0])


def _install():
    reads, writes = set(), set()

    def hook(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, os.PathLike)):
            return
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool((flags or 0) & _WRITE)
        path = os.path.abspath(os.fspath(args[0]))
        if not os.path.isdir(path):  # folders are listed or removed, not read
            (writes if writing else reads).add(path)

    def save():
        path = os.path.join(_FOLDER, f"{os.getpid()}.tsv")
        with open(path, "w") as handle:
            own = writes | {_final_name(p) for p in writes}
            handle.write(shlex.join(sys.argv) + "\n"
                         + "".join(f"{r}\n" for r in sorted(reads - own)))

    import atexit

    sys.addaudithook(hook)
    atexit.register(save)


if _FOLDER and os.path.basename(sys.argv[0] if sys.argv else "") == "mgs":
    _install()
