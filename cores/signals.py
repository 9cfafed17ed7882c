"""Ctrl-C held back while native code initialises (standard library only: imported first)."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Record a Ctrl-C inside the block and raise KeyboardInterrupt when the block ends.

    Loading torch or torchvision runs C++ initialisers that call back into Python; a
    KeyboardInterrupt raised inside such a callback cannot unwind through C++ and aborts the process
    (SIGABRT, "terminate called after throwing pybind11::error_already_set") instead of reaching the
    one-line handler.  Where SIGINT is ignored, or off the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    pending: list = []
    before = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if pending:
        raise KeyboardInterrupt
