"""One writer per run folder: an exclusive lock held for the whole run.

A run takes `<run>/.lock` (shard k of n: `<run>/.lock.shard<k>of<n>`), so the shards of one run
fill one folder side by side while a second process of the same shard (another seed, another
config, the same command typed twice) is refused in one line naming the holder.  Under torchrun
rank 0 holds the lock for all ranks.  A job of another sharding (`num_shards` differs) is refused
too while any lock of the folder is held.

The lock is `flock` on the lock file (created atomically with O_CREAT), which the kernel releases
when the holder exits in any way, kill -9 included: a lock file left by a dead process is stale
by construction and never blocks (on NFS, Linux maps flock to the server's byte-range locks, which
the server frees when the client's lease ends).  The file holds pid, host and start time of the
current holder, for the message only.  `.lock.config` is held briefly while a job checks and
writes `config.yaml`, so two jobs started together cannot both find the folder empty.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import os
import re
import socket
from pathlib import Path
from typing import Optional

from cores.errors import ConfigError

CONFIG_LOCK = ".lock.config"
_SHARD_LOCK = re.compile(r"^\.lock(?:\.shard(\d+)of(\d+))?$")


def lock_name(shard: int = 0, num_shards: int = 1) -> str:
    return ".lock" if num_shards == 1 else f".lock.shard{shard}of{num_shards}"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _try_flock(fd: int, how: int) -> bool:
    """True when taken; False when another open file holds it; raises when the file system cannot lock."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class RunLock:
    """`with RunLock(root, shard, num_shards):` holds the folder's lock for this shard, or raises
    ConfigError naming the holder."""

    def __init__(self, root: Path, shard: int = 0, num_shards: int = 1):
        self.root, self.shard, self.num_shards = Path(root), int(shard), int(num_shards)
        self.path = self.root / lock_name(self.shard, self.num_shards)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_flock(fd, fcntl.LOCK_EX):
                raise ConfigError(f"{self.root} is being written by {_holder(self.path)} (lock {self.path}); "
                                  "wait until it ends or choose another name=")
            self._refuse_other_sharding()
        except OSError as err:  # a file system without locks: run, but say that nothing guards the folder
            os.close(fd)
            from cores.console import warn

            warn(f"cannot lock {self.path} ({err.strerror}); a second process writing {self.root} would not "
                 "be detected")
            return self
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def announce(self) -> None:
        """Write pid, host and start time into the held lock file (for the message a second process
        prints).  Called once the folder has accepted the run, so that a refused run changes no file."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        started = _dt.datetime.now().isoformat(timespec="seconds")
        os.pwrite(self._fd, f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode(), 0)

    def _refuse_other_sharding(self) -> None:
        """A held lock of another `num_shards` means a job of another image split is writing here."""
        for p in sorted(self.root.iterdir()):
            m = _SHARD_LOCK.match(p.name)
            if not m or p == self.path or int(m.group(2) or 1) == self.num_shards:
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                if not _try_flock(fd, fcntl.LOCK_SH):
                    raise ConfigError(f"{self.root} is being written by {_holder(p)} with another sharding "
                                      f"(lock {p}); wait until it ends or choose another name=")
            finally:
                os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        self.announce()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ConfigLock:
    """Held while a job compares and writes the folder's config.yaml (blocks until free)."""

    def __init__(self, root: Path):
        self.path = Path(root) / CONFIG_LOCK
        self._fd: Optional[int] = None

    def __enter__(self) -> "ConfigLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this file system: the run lock's warning says so
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
