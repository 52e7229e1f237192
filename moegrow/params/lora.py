"""LoRA adapters (Hu et al. 2021, eq. 3) on any weight of the model, one per expert in expert tables.

    W_eff = W + (alpha / r) A B

A weight is split by its shape suffix into [E] x in x out: a leading E (expert tables, e.g.
`wact_EDF`) is a batch axis, so every expert has its own A [E, in, r] and B [E, r, out] (never a
shared B); d_model D is the input when it comes first (`wq_DHA`: in D, out HA; `wact_EDF`: in D,
out F) and the output when it comes last (`wo_HAD`: in HA, out D; `wo_EFD`: in F, out D).
A starts at N(0, 1/in) and B at 0, so adding adapters changes nothing (exact). The effective
weights are formed before the model runs, so the grouped-FFN / ragged_dot kernels are unchanged
(cost: one [in, r] x [r, out] product per adapted matrix and expert per step).

Adapters are a plain tree mirroring the params: {..., "wact_EDF": {"A": [E, D, r], "B": [E, r, F]}}
for every adapted leaf. `apply` (= `merge`) folds them in; `unmerge` subtracts them again.
"""
from __future__ import annotations

import re
import zlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moegrow.config import LORA_TARGETS as DEFAULT_TARGETS
from moegrow.params.trees import flatten, unflatten

ROUTER = r"blocks/\d+/mlp/router_DE"  # the router is opt-in: add it to the targets


def factor_axes(path: str, shape: Sequence[int]) -> tuple[int, int, int]:
  """(batch, in, out) sizes of the weight at `path` from its shape suffix (see the module doc)."""
  letters = path.rsplit("/", 1)[-1].rsplit("_", 1)[-1]
  if len(letters) != len(shape) or len(shape) < 2:
    raise ValueError(f"lora: {path} (shape {tuple(shape)}) is not a matrix with a shape suffix")
  batch = 1
  if letters[0] == "E" and len(shape) >= 3:
    batch, letters, shape = shape[0], letters[1:], shape[1:]
  n_in = len(shape) - 1 if letters[-1] == "D" and letters[0] != "D" else 1
  return int(batch), int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def targets(params: Mapping, patterns: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
  """The param paths matched (re.fullmatch) by `patterns`; a pattern matching nothing is an error."""
  flat = flatten(params)
  out = [p for p in flat if any(re.fullmatch(pt, p) for pt in patterns)]
  unused = [pt for pt in patterns if not any(re.fullmatch(pt, p) for p in flat)]
  if unused:
    raise ValueError(f"lora: target pattern(s) {unused} match no parameter")
  bad = [p for p in out if np.ndim(flat[p]) < 2]
  if bad:
    raise ValueError(f"lora: targets {bad} are not matrices")
  return out


def init(params: Mapping, *, rank: int, key, patterns: Sequence[str] = DEFAULT_TARGETS,
         dtype=jnp.float32) -> dict:
  """Adapters for every targeted weight: A ~ N(0, 1/in), B = 0 (adding them is exact)."""
  if rank < 1:
    raise ValueError(f"lora: rank must be >= 1, got {rank}")
  flat = flatten(params)
  out = {}
  for path in targets(params, patterns):
    e, d_in, d_out = factor_axes(path, flat[path].shape)
    k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    out[f"{path}/A"] = (jax.random.normal(k, (e, d_in, rank), jnp.float32) / np.sqrt(d_in)).astype(dtype)
    out[f"{path}/B"] = jnp.zeros((e, rank, d_out), dtype)
  return unflatten(out)


def abstract(params: Mapping, *, rank: int, patterns: Sequence[str] = DEFAULT_TARGETS) -> dict:
  """ShapeDtypeStructs (float32) of `init`'s adapters for params (or abstract params)."""
  flat = flatten(params)
  out = {}
  for path in targets(params, patterns):
    e, d_in, d_out = factor_axes(path, flat[path].shape)
    out[f"{path}/A"] = jax.ShapeDtypeStruct((e, d_in, rank), jnp.float32)
    out[f"{path}/B"] = jax.ShapeDtypeStruct((e, rank, d_out), jnp.float32)
  return unflatten(out)


def logical_axes(params: Mapping, axes: Mapping, patterns: Sequence[str] = DEFAULT_TARGETS) -> dict:
  """Logical axes of the adapters: an expert table's A and B are sharded like its expert axis;
  everything else is replicated (adapters are small)."""
  flat, flat_axes = flatten(params), flatten(axes, )
  out = {}
  for path in targets(params, patterns):
    e_axis = flat_axes.get(path, (None,))[0] if factor_axes(path, flat[path].shape)[0] > 1 else None
    out[f"{path}/A"] = out[f"{path}/B"] = (e_axis, None, None)
  return unflatten(out)


def rank_of(adapters: Mapping) -> int:
  ranks = {a.shape[-1] for p, a in flatten(adapters).items() if p.endswith("/A")}
  if len(ranks) != 1:
    raise ValueError(f"lora: adapters must share one rank, found {sorted(ranks)}")
  return ranks.pop()


def delta(path: str, w, a, b):
  """(A B) for one weight, in its own shape: per expert [in, r] x [r, out] (float32). `a` is
  [E, in, r] and `b` [E, r, out] over the weight's flattened input and output axes, which have no
  letter of their own (docs/letters.md), so the names carry none."""
  prod = jnp.einsum("eir,ero->eio", a.astype(jnp.float32), b.astype(jnp.float32))
  return prod.reshape(w.shape)


def _fold(params: Mapping, adapters: Mapping, alpha: float, sign: float) -> dict:
  flat, ad = flatten(params), flatten(adapters)
  paths = sorted({p.rsplit("/", 1)[0] for p in ad})
  missing = [p for p in paths if p not in flat]
  if missing:
    raise ValueError(f"lora: adapters for {missing} have no parameter in this model")
  scale = float(alpha) / rank_of(adapters)
  out = dict(flat)
  for p in paths:
    w = flat[p]
    e, d_in, d_out = factor_axes(p, w.shape)
    a, b = ad[f"{p}/A"], ad[f"{p}/B"]
    if a.shape[:2] != (e, d_in) or b.shape[0] != e or b.shape[2] != d_out:
      raise ValueError(f"lora: adapter of {p} has A {a.shape}, B {b.shape}; the weight {w.shape} needs "
                       f"A ({e}, {d_in}, r) and B ({e}, r, {d_out})")
    out[p] = (w.astype(jnp.float32) + sign * scale * delta(p, w, a, b)).astype(w.dtype)
  return unflatten(out)


def apply(params: Mapping, adapters: Mapping, alpha: float) -> dict:
  """Params with every adapter folded in: W + (alpha / r) A B (the model to run, or to save:
  `merge` is the same function)."""
  return _fold(params, adapters, alpha, 1.0)


merge = apply


def unmerge(params: Mapping, adapters: Mapping, alpha: float) -> dict:
  """The inverse of `merge` up to float rounding: W - (alpha / r) A B."""
  return _fold(params, adapters, alpha, -1.0)
