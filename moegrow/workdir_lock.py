"""One run per workdir: an exclusive lock file `<workdir>/.lock` holding the holder's host and PID.

A second process on the same workdir is refused with a message naming the holder. A lock left by a
dead process (SIGKILL, a crash) is detected and taken over with a message. Multi-host runs take it
on process 0 only.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys

LOCK_NAME = ".lock"


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """Context manager (`acquire()` / `release()` for explicit use). The lock is an exclusive
  `flock` on the file, so the kernel releases it when the holder dies; the file's content (host,
  PID) names the holder in messages and tells that a dead process left it."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.enabled = enabled
    self._fd: int | None = None
    self.me = {"host": socket.gethostname(), "pid": os.getpid()}

  def _holder(self, fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
      return json.loads(raw) if raw else {}
    except ValueError:
      return {}

  def acquire(self) -> "WorkdirLock":
    if not self.enabled or self._fd is not None:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise WorkdirLocked(f"workdir {os.path.dirname(self.path)} is in use by process {holder.get('pid', '?')} on "
                          f"host {holder.get('host', '?')} (lock {self.path}); one run per workdir: wait for it "
                          f"or stop it first") from None
    old = self._holder(fd)
    if old:
      print(f"taking over the stale lock {self.path} left by process {old.get('pid')} on host {old.get('host')} "
            f"(no longer running)", file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(self.me).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # an empty lock file is a clean release
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
