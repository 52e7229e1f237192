"""Run output: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), progress lines."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np


def _scalar(v) -> float | None:
  try:
    a = np.asarray(v)
  except Exception:  # noqa: BLE001 - non-numeric values are simply not logged
    return None
  return float(a) if a.ndim == 0 and np.issubdtype(a.dtype, np.number) else None


def flatten_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
  """{'moe': {'1': {'load': [..]}}} -> {'moe/1/load/0': ..}; arrays are spread per entry."""
  out: dict[str, float] = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_metrics(v, name + "/"))
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      out[name] = float(a)
    else:
      out.update({f"{name}/{i}": float(x) for i, x in enumerate(a.reshape(-1))})
  return out


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is
  installed, only to accept torch tensors (seconds of start-up for every run); we log floats."""
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hidden:
      del sys.modules["torch"]
  return SummaryWriter


class Logbook:
  """Writes on process 0 only; every other process gets a silent logbook."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._repair()
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
    self._t0 = time.perf_counter()
    self._steps0 = None

  def _repair(self) -> None:
    """A torn last line (a process killed mid-write) is cut off, with a message; never fatal."""
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      blob = f.read()
    if blob and not blob.endswith(b"\n"):
      keep = blob[:blob.rfind(b"\n") + 1]
      _rewrite(self.path, keep)
      print(f"{self.path}: removed a torn last line ({len(blob) - len(keep)} bytes)", flush=True)

  def truncate_after(self, step: int) -> None:
    """Drop rows after `step` (a resume from the checkpoint at `step` replays them): each step
    appears once in metrics.jsonl."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
      try:
        row_step = int(json.loads(line)["step"])
      except (ValueError, KeyError, TypeError):
        continue  # an unreadable row: not worth keeping
      if row_step <= step:
        keep.append(line)
    if len(keep) != len(lines):
      _rewrite(self.path, b"".join(keep))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def progress(self, step: int, loss: float, tokens_per_s: float, start_step: int, stage: str = "") -> None:
    if not self.enabled:
      return
    if self._steps0 is None:
      self._steps0, self._t0 = start_step, time.perf_counter()
    done = max(step - self._steps0, 1)
    eta = (time.perf_counter() - self._t0) / done * (self.total_steps - step)
    tag = f"[{stage}] " if stage else ""
    print(f"{tag}step {step:>6}/{self.total_steps} | loss {loss:7.4f} | {tokens_per_s/1e3:8.1f}k tok/s | "
          f"ETA {_hms(eta)}", flush=True)

  def say(self, msg: str) -> None:
    if self.enabled:
      print(msg, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _rewrite(path: str, blob: bytes) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)


def _hms(s: float) -> str:
  s = int(max(s, 0))
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def print_table(rows: list[dict[str, Any]], cols: list[str], file=sys.stdout) -> None:
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
  print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
  for r in rows:
    print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)), file=file)
  file.flush()
