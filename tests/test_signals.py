"""cores/signals.py: a Ctrl-C inside the deferred block is held back and raised when it ends."""
from __future__ import annotations

import signal

import pytest

from cores.signals import ctrl_c_deferred


def test_ctrl_c_inside_the_block_is_raised_after_it():
    # Python's own handler, whatever the parent left (a background job of a shell ignores SIGINT)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached_end = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_deferred():
                signal.raise_signal(signal.SIGINT)  # this thread, now; the handler only records it
                reached_end = True
        assert reached_end
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_no_ctrl_c_no_exception_and_ignored_stays_ignored():
    with ctrl_c_deferred():
        pass
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_deferred():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
