"""Records every file an `mgs` process opens for reading, when MGS_READ_TRACE names a folder:
one TSV per process (its command line, then one path per line). Put this folder on PYTHONPATH;
tests/test_workflow.py compares what each job read with what its rule declares."""

import os
import sys

_FOLDER = os.environ.get("MGS_READ_TRACE")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT


def _install():
    reads = set()

    def hook(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, os.PathLike)):
            return
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool((flags or 0) & _WRITE)
        if not writing:
            reads.add(os.path.abspath(os.fspath(args[0])))

    def save():
        path = os.path.join(_FOLDER, f"{os.getpid()}.tsv")
        with open(path, "w") as handle:
            handle.write(" ".join(sys.argv) + "\n" + "".join(f"{r}\n" for r in sorted(reads)))

    import atexit

    sys.addaudithook(hook)
    atexit.register(save)


if _FOLDER and os.path.basename(sys.argv[0] if sys.argv else "") == "mgs":
    _install()
