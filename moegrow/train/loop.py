"""The resumable, preemptible training loop of one stage: steps, logging, evaluation,
checkpoints every `checkpoint_every`, at the end and on SIGTERM."""
from __future__ import annotations

import json
import signal
import time
from typing import Any

import jax
import numpy as np

from moegrow import checkpoint
from moegrow.data import ShardedIterator
from moegrow.train.logbook import flatten_metrics, print_table
from moegrow.train.probes import evaluate
from moegrow.train.steps import to_global


class Preempted:
  """SIGTERM: the loop saves a checkpoint and returns cleanly. One process: a handler sets a flag.
  Many: jax's preemption service (it catches SIGTERM itself; any process may get it) names the
  step at which every process stops, so all of them save the same step together."""

  def __init__(self):
    self.flag = False
    self._old = None
    self._sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

  def __enter__(self):
    if self._sync:
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._set)
    except ValueError:  # not the main thread: no handler, no preemption support
      self._old = None
    return self

  def _set(self, *_):
    self.flag = True

  def reached(self, step: int) -> bool:
    """Whether to stop after `step`; with many processes, call it at every step."""
    if self._sync:
      from jax.experimental import multihost_utils
      self.flag = self.flag or multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def __exit__(self, *_):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def global_data_state(it: ShardedIterator) -> dict:
  """The iterator state of every process's shards (each process holds only its own)."""
  state = it.get_state()
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  for row, n in zip(every, sizes):
    state["shards"].update(json.loads(bytes(row[:n]))["shards"])
  return state


def run_loop(program, state, it, mngr, book, evals, meta, tr, end: int, pre: "Preempted",
             stage_name: str = "", ctx: dict | None = None) -> dict[str, Any]:
  """Train from `state['step']` to global step `end`: checkpoints every `checkpoint_every`, at
  `end` and on SIGTERM (`pre`); evaluates every `eval_every` and at `end`. A state is saved only
  if its loss, gradient norm and parameters are finite. `ctx`: the train step's fixed inputs for
  an objective (EWC's Fisher and anchor, saved with every checkpoint; a distillation teacher)."""
  start = int(state["step"])
  last_saved = mngr.latest_step()
  step, prev, t_log, tok = start, None, time.perf_counter(), 0
  result: dict[str, Any] = {"step": start, "preempted": False}
  stop = end
  while step < stop:
    local = next(it)
    batch = to_global(program, local)
    state, metrics = program.train_step(state, batch) if ctx is None else program.train_step(state, batch, ctx)
    tok += batch["inputs"].size
    if prev is not None:  # check the previous step's loss: keeps dispatch one step ahead
      _check_finite({"loss": prev[0]}, prev[1], mngr, last_saved)
    step, prev = step + 1, (metrics["loss"], step + 1)
    if step % tr.log_every == 0 or step == tr.steps:
      loss = float(metrics["loss"])
      _check_finite({"loss": metrics["loss"]}, step, mngr, last_saved)
      dt = time.perf_counter() - t_log
      row = flatten_metrics(jax.device_get(metrics))
      row["tokens_per_s"] = tok / dt
      book.write(step, row)
      book.progress(step, loss, tok / dt, start, stage_name)
      t_log, tok = time.perf_counter(), 0
      result.update(loss=loss, tokens_per_s=row["tokens_per_s"])
    if tr.eval_every and (step % tr.eval_every == 0 or step == stop):
      ev = evaluate(program, state["params"], evals)
      book.write(step, ev)
      result.update(ev)
    preempted = pre.reached(step)
    if preempted or step % tr.checkpoint_every == 0 or step == stop:
      # Never save a poisoned state: loss, gradient norm and parameters must be finite.
      _check_finite({"loss": metrics["loss"], "gradient norm": metrics["grad_norm"],
                     "parameters": program.all_finite(state["params"])}, step, mngr, last_saved)
      checkpoint.save(mngr, step, state, meta, global_data_state(it), ewc=(ctx or {}).get("ewc"))
      last_saved = step
    if preempted:
      mngr.wait_until_finished()
      book.say(f"SIGTERM: saved checkpoint {checkpoint.step_dir(mngr, step)} at step {step}; exiting")
      result["preempted"] = True
      break
  mngr.wait_until_finished()
  result["step"], result["state"] = step, state
  if not result["preempted"] and any(k.startswith("eval/") for k in result):
    rows = [{"domain": d, "loss": result.get(f"eval/{d}/loss", float("nan")),
             "bits/byte": result.get(f"eval/{d}/bpb", float("nan"))} for d in evals]
    if jax.process_index() == 0:
      print_table(rows, ["domain", "loss", "bits/byte"])
  return result


def _check_finite(values: dict, at: int, mngr, last_saved) -> None:
  """FloatingPointError naming the first non-finite value (booleans: False = not all finite),
  the step, and the newest checkpoint (whose state was checked finite when it was saved)."""
  for what, v in values.items():
    x = np.asarray(v)
    ok = bool(x) if x.dtype == bool else bool(np.all(np.isfinite(x)))
    if not ok:
      where = checkpoint.step_dir(mngr, last_saved) if last_saved is not None else "none in this stage yet"
      shown = "not all finite" if x.dtype == bool else f"{float(x)}"
      raise FloatingPointError(f"{what} is {shown} at step {at}; stopping without saving it. Newest checkpoint "
                               f"(finite parameters): {where}")
