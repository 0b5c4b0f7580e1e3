"""pycolmap, imported so that it keeps the process's SIGTERM handler.

COLMAP installs glog's failure-signal handler when pycolmap is imported, and that handler takes
SIGTERM too: a job cancelled by `scancel` would die with a stack dump instead of stopping after its
step with a checkpoint. The handler that was there before the import is put back.
"""

import signal
import threading

_before = signal.getsignal(signal.SIGTERM)
import pycolmap  # noqa: E402

if _before is not None and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _before)

__all__ = ["pycolmap"]
