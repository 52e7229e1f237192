"""Shared timing helpers for the benchmark scripts (not a test dependency)."""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn, *args, warmup: int = 2, min_time: float = 2.0, min_iters: int = 5) -> float:
  """Median seconds per call of a jitted fn (outputs blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  t_end = time.perf_counter() + min_time
  while len(times) < min_iters or time.perf_counter() < t_end:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_peak(dtype=jnp.float32, sizes=(1024, 2048)) -> dict[int, float]:
  """Measured matmul FLOP/s of this machine for square sizes (the MFU denominator)."""
  out = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    out[n] = 2 * n**3 / time_fn(f, a, b, min_time=1.0)
  return out


def print_table(rows: list[dict], cols: list[str]) -> None:
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
  print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
