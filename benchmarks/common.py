"""Shared helpers for the benchmark scripts: timing, the machine's matmul peak, train steps."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

TRAIN = ml_collections.ConfigDict(dict(lr=1e-3, steps=1000, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1,
                                       b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0, seed=0, frozen=()))


def time_fn(fn, *args, warmup: int = 2, min_time: float = 2.0, min_iters: int = 5) -> float:
  """Median seconds per call (outputs blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  t_end = time.perf_counter() + min_time
  while len(times) < min_iters or time.perf_counter() < t_end:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def time_interleaved(fns: dict, min_time: float = 2.0, rounds: int = 5) -> dict[str, float]:
  """Median seconds per call of each `name: (fn, args)`, measured in alternating rounds so slow
  drifts of a shared machine hit every candidate alike (ratios are what the tables report)."""
  for fn, args in fns.values():
    for _ in range(2):
      jax.block_until_ready(fn(*args))
  samples = {name: [] for name in fns}
  per_round = min_time / rounds
  for _ in range(rounds):
    for name, (fn, args) in fns.items():
      t_end = time.perf_counter() + per_round
      while True:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples[name].append(time.perf_counter() - t0)
        if time.perf_counter() >= t_end:
          break
  return {name: float(np.median(v)) for name, v in samples.items()}


def matmul_peak(dtype=jnp.float32, sizes=(1024, 2048), min_time: float = 1.0) -> dict[int, float]:
  """Measured FLOP/s of square matmuls (the MFU denominator is the best of these)."""
  out = {}
  f = jax.jit(jnp.dot)
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    out[n] = 2 * n**3 / time_fn(f, a, b, min_time=min_time)
  return out


class TrainStep(NamedTuple):
  """A compiled train step: `run()` takes one step (on a fixed batch) and returns its loss."""
  run: Callable
  compile_s: float
  program: object  # moegrow.train.steps.Program (its abstract_state sizes params and optimizer state)


def train_step_fn(cfg, batch: int, seq: int, objective=None, ctx_of=None, frozen: tuple = ()) -> TrainStep:
  """The train step of `cfg` on one device with random byte tokens, compiled ahead of time.
  `objective`: a moegrow.train.steps.Objective, `ctx_of(state)` the context it needs (None: none);
  `frozen`: the train config's frozen parameter patterns (e.g. LoRA's frozen base)."""
  from moegrow import sharding
  from moegrow.train import steps
  train = ml_collections.ConfigDict(TRAIN.to_dict())
  train.frozen = frozen
  prog = steps.build_program(cfg, train, sharding.make_mesh({"data": 1}), objective)
  state = prog.init(jax.random.key(0))
  toks = np.random.default_rng(0).integers(0, 256, (batch, seq + 1), dtype=np.int32)
  b = jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:]}, prog.batch_sharding)
  ctx = None if ctx_of is None else ctx_of(state)
  args = (state, b) if ctx is None else (state, b, ctx)
  t0 = time.perf_counter()
  compiled = prog.train_step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def run():
    box[0], m = compiled(box[0], *args[1:])
    return m["loss"]
  return TrainStep(run, compile_s, prog)


def header(title: str) -> str:
  return (f"# {title} | {time.strftime('%Y-%m-%d')} | {platform.machine()} x{os.cpu_count()} cores | "
          f"jax {jax.__version__} ({jax.default_backend()})")


def print_table(rows: list[dict], cols: list[str]) -> None:
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
  print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)), flush=True)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
