"""Ramped growth (MSG: Yao et al. 2024, "Masked Structural Growth", arXiv 2305.02869).

A growth op with `ramp_steps=N` adds its new units behind a mask m that training moves linearly
from 0 to 1 over the next N steps. At m = 0 the grown model computes exactly the old function
whatever the new weights are (so they get a proper random init); at m = 1 it is exactly the plain
grown model. Maths and what each op masks: docs/growth.md, "Ramped growth".

A ramp is a `ModelConfig.ramps` entry (name, steps N, targets); its mask is the float32 scalar
`params['ramp'][name]`. A target (kind, path, axis, start, stop) names the slice [start, stop) along
`axis` of the weight at `path`:

    "scale":    W[slice] <- m * W[slice]                      (output projections of new units)
    "logbias":  b[slice] <- b[slice] + max(log m, -1e4)       (router bias of new experts)

Output projections enter the residual stream linearly, so scaling the new units' rows (or a new
block's whole projections) by m scales exactly their contribution. A new expert's router logit
shifted by log m multiplies its softmax weight by m; at m = 0 the shift is the -1e4 of
`add_experts(mode='exact')`: the expert is never in the top-k and its softmax mass underflows to 0.
Outside its slice a weight is returned unchanged (bit for bit), and at m = 1 so is the slice
(x * 1.0 == x, b + log 1 == b), so a finished ramp is bit-identical to the plain model.

Pure functions on plain dicts, like `moegrow.params.lora`: `apply` (the effective weights the model runs
on), `fold` (bake the masks in for good), `advance` (one training step of every ramp).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moegrow.config import ModelConfig
from moegrow.params.trees import flatten, unflatten

KEY = "ramp"  # params[KEY][name]: the mask of ramp `name`
LOG_FLOOR = -1e4  # log m is clipped here: m = 0 gives add_experts' "never selected" bias


def entry(name: str, steps: int, targets: Sequence[tuple]) -> tuple:
  """One `ModelConfig.ramps` entry (validated when the config is built)."""
  return (str(name), int(steps), tuple(tuple(t) for t in targets))


def scale(path: str, axis: int, start: int, stop: int) -> tuple:
  """A "scale" target: the slice [start, stop) along `axis` of the weight at `path` times m."""
  return ("scale", path, int(axis), int(start), int(stop))


def logbias(path: str, start: int, stop: int) -> tuple:
  """A "logbias" target: entries [start, stop) of the bias vector at `path` plus max(log m, -1e4)."""
  return ("logbias", path, 0, int(start), int(stop))


def names(cfg: ModelConfig) -> list[str]:
  return [r[0] for r in cfg.ramps]


def strip(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without ramps (the plain model of the same weights)."""
  return cfg.replace(ramps=()) if cfg.ramps else cfg


def init(cfg: ModelConfig) -> dict:
  """Every mask at 0 (the growth boundary): {name: float32 scalar 0}."""
  return {n: jnp.zeros((), jnp.float32) for n in names(cfg)}


def abstract(cfg: ModelConfig) -> dict:
  """ShapeDtypeStructs of `init`'s masks."""
  return {n: jax.ShapeDtypeStruct((), jnp.float32) for n in names(cfg)}


def logical_axes(cfg: ModelConfig) -> dict:
  """The masks are replicated scalars: logical axes ()."""
  return {n: () for n in names(cfg)}


def by_path(cfg: ModelConfig) -> dict[str, list[tuple[str, tuple]]]:
  """{weight path: [(ramp name, target), ...]} in the config's order (the order they are applied)."""
  out: dict[str, list] = {}
  for name, _, targets in cfg.ramps:
    for t in targets:
      out.setdefault(t[1], []).append((name, t))
  return out


def check(params: Mapping, cfg: ModelConfig) -> None:
  """ValueError listing every target whose weight is missing or whose slice does not fit it
  (`params` may be abstract; a 'ramp' subtree is ignored)."""
  flat = flatten({k: v for k, v in params.items() if k != KEY})
  bad = []
  for path, items in by_path(cfg).items():
    for name, (kind, _, axis, start, stop) in items:
      if path not in flat:
        bad.append(f"{name}: {path} is not a parameter of this model")
        continue
      shape = tuple(flat[path].shape)
      if kind == "logbias" and len(shape) != 1:
        bad.append(f"{name}: logbias target {path} of shape {shape} is not a vector")
      elif axis >= len(shape) or stop > shape[axis]:
        bad.append(f"{name}: slice [{start}, {stop}) along axis {axis} does not fit {path} of shape {shape}")
  if bad:
    raise ValueError("ramps do not fit the model:\n  " + "\n  ".join(bad))


def mask_leaf(w, target: tuple, m):
  """One target's mask on its weight `w` (any array of the weight's shape and dtype; m a scalar).
  Entries outside the slice are returned unchanged, bit for bit."""
  kind, _, axis, start, stop = target
  idx = jnp.arange(w.shape[axis])
  shape = [1] * w.ndim
  shape[axis] = -1
  inside = ((idx >= start) & (idx < stop)).reshape(shape)
  m = jnp.asarray(m, jnp.float32)
  if kind == "scale":
    new = w * m.astype(w.dtype)
  elif kind == "logbias":
    new = w + jnp.maximum(jnp.log(m), LOG_FLOOR).astype(w.dtype)
  else:
    raise ValueError(f"ramp: unknown target kind {kind!r}")
  return jnp.where(inside, new, w)


def fold_leaf(w, items: Sequence[tuple[str, tuple]], masks: Mapping):
  """`w` with the targets `items` ([(ramp name, target)], as in `by_path`) applied in order, each
  with its mask masks[name]."""
  for name, t in items:
    w = mask_leaf(w, t, masks[name])
  return w


def _masks(params: Mapping, cfg: ModelConfig) -> dict:
  got = params.get(KEY)
  missing = sorted(set(names(cfg)) - set(got or {}))
  if got is None or missing:
    raise ValueError(f"params lack the ramp masks {missing or names(cfg)} (params['{KEY}']) of the model's ramps")
  extra = sorted(set(got) - set(names(cfg)))
  if extra:
    raise ValueError(f"params['{KEY}'] holds masks {extra} of no ramp in the model config")
  return got


def apply(params: Mapping, cfg: ModelConfig) -> dict:
  """The effective weights: every target masked with its current m, params['ramp'] dropped (the
  params of `strip(cfg)`). The masks get no gradient (stop_gradient): they are state, not weights."""
  if not cfg.ramps:
    return dict(params)
  masks = {n: jax.lax.stop_gradient(m) for n, m in _masks(params, cfg).items()}
  check(params, cfg)
  flat = flatten({k: v for k, v in params.items() if k != KEY})
  for path, items in by_path(cfg).items():
    flat[path] = fold_leaf(flat[path], items, masks)
  return unflatten(flat)


def fold(params: Mapping, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Bake the masks into the weights for good: (effective params, config without ramps). Exact
  for any m; after a finished ramp (m = 1) the weights are bit-identical to the stored ones."""
  return apply(params, cfg), strip(cfg)


def advance(params: Mapping, cfg: ModelConfig) -> dict:
  """One training step of every ramp: m <- min(1, m + 1/N) in float32, snapped to 1 when within
  half a step of it (so N steps from 0 end at exactly 1 whatever the rounding of 1/N)."""
  if not cfg.ramps:
    return dict(params)
  masks = dict(_masks(params, cfg))
  for name, steps, _ in cfg.ramps:
    m = jnp.asarray(masks[name], jnp.float32)
    nxt = m + np.float32(1.0 / steps)
    masks[name] = jnp.where(nxt >= np.float32(1.0 - 0.5 / steps), jnp.float32(1.0), nxt).astype(jnp.float32)
  return {**params, KEY: masks}
