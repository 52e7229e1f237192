"""What the command-line entry points do with errors: a bad config, a locked workdir, a full
disk, a non-finite loss or a refused checkpoint ends the command with one message naming the
problem (exit 1), not a traceback. `MOEGROW_TRACEBACK=1` shows the traceback too."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from moegrow.workdir_lock import WorkdirLocked

USER_ERRORS = (ValueError, OSError, FloatingPointError, WorkdirLocked, KeyError)
# Echoes of one unreadable checkpoint: when a restore fails, the checkpointer's other pending reads
# fail after its event loop has closed, each printing a page of "Exception ignored" with the array
# store's spec. The restore's own error names the checkpoint; these are dropped.
_ECHOES = ("Event loop is closed", "Encountered error while reading array index")


def _quiet_echoes(unraisable) -> None:
  if not str(unraisable.exc_value).startswith(_ECHOES):
    sys.__unraisablehook__(unraisable)


def run_command(fn: Callable[[], None]) -> None:
  """Run `fn`; a user error prints `moegrow: error: <message>` and exits with status 1."""
  sys.unraisablehook = _quiet_echoes
  try:
    fn()
  except USER_ERRORS as e:
    if os.environ.get("MOEGROW_TRACEBACK"):
      traceback.print_exc()
    print(f"moegrow: error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
