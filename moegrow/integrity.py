"""Checksums of array trees: what a checkpoint records of every leaf it saves, and what every restore
compares against.

Orbax stores no checksum of array data, and OCDBT packs arrays into shared files, so a flipped or
cut-off byte would otherwise restore as a wrong number. At save, `checksums` computes for every leaf
(params, optimizer moments, the step, EWC's Fisher and anchor) a 32-bit sum of its raw bits under
`jit`, on the sharded arrays where they live: no file is read back, every process gets the same
answer. Integer sums wrap modulo 2^32 and are exact whatever the reduction order, so the same values
give the same checksum on any mesh and any number of hosts. With b_i the bits of element i and i its
row-major index over the whole array,

  c = sum_i b_i * (2 i + 1)   (mod 2^32)

Any single-bit change of any element changes c (2^k times an odd number is not 0 mod 2^32); two
changes cancel with probability about 2^-32.

The same pass reports which leaves hold a non-finite value (`nonfinite`): a checkpoint is never
written with one, nor built on.

`mismatches` compares restored arrays with recorded checksums and returns the paths that differ.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "u32-weighted-sum-v1"  # the sum above; stored with every record
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _row_major_index(shape: tuple) -> jax.Array:
  """i for every element (uint32, wrapping), from one iota per axis: no reshape, so a sharded
  array is never moved."""
  idx, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return idx


def _leaf_sums(x: jax.Array) -> jax.Array:
  """[c, finite] (uint32) of one array."""
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif size in _UINT:
    bits = jax.lax.bitcast_convert_type(x, _UINT[size]).astype(jnp.uint32)
  else:
    raise ValueError(f"no checksum for dtype {x.dtype} (itemsize {size})")
  c = jnp.sum(bits * (2 * _row_major_index(x.shape) + 1), dtype=jnp.uint32)
  # x * 0 is 0 for finite x and NaN for NaN or infinity: one float sum (fast everywhere) finds both.
  finite = (jnp.isfinite(jnp.sum(x.astype(jnp.float32) * 0.0)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.bool_(True))
  return jnp.stack([c, finite.astype(jnp.uint32)])


@jax.jit
def _all_sums(leaves: list) -> list:
  return [_leaf_sums(x) for x in leaves]


def _host_value(x) -> np.ndarray:
  """A small result that every process holds in full (replicated): its first local copy."""
  return np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else np.asarray(x)


def _flat(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "dtype"))
  return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in leaves if hasattr(v, "dtype")}


def survey(tree: Any, prefix: str = "") -> tuple[dict[str, str], list[str]]:
  """One pass over `tree`: ({prefix + '/'-joined path: 'dtype:c'} for every array leaf (c in hex),
  [paths of the leaves that hold a NaN or an infinity])."""
  flat = _flat(tree)
  if not flat:
    return {}, []
  sums = _all_sums(list(flat.values()))
  out, bad = {}, []
  for (path, x), s in zip(flat.items(), sums):
    c, finite = (int(v) for v in _host_value(s))
    out[prefix + path] = f"{jnp.dtype(x.dtype).name}:{c:08x}"
    if not finite:
      bad.append(prefix + path)
  return out, bad


def checksums(tree: Any, prefix: str = "") -> dict[str, str]:
  """{prefix + '/'-joined path: 'dtype:c'} for every array leaf of `tree` (c in hex)."""
  return survey(tree, prefix)[0]


def nonfinite(tree: Any, prefix: str = "") -> list[str]:
  """Paths of `tree`'s leaves holding a NaN or an infinity."""
  return survey(tree, prefix)[1]


def mismatches(tree: Any, recorded: Mapping[str, str], prefix: str = "",
               sums: Mapping[str, str] | None = None) -> list[str]:
  """Paths (with `prefix`) of `tree`'s leaves whose checksum differs from `recorded`, or that
  `recorded` lacks. A leaf restored at a wider dtype than it was saved at (bfloat16 saved, float32
  restored: exact) is checked at its saved dtype; one restored narrower cannot be checked. `sums`:
  `checksums(tree, prefix)` when already computed."""
  flat = _flat(tree)
  if sums is not None and all(p in recorded and recorded[p].split(":")[0] == v.split(":")[0] for p, v in sums.items()):
    return [p for p, v in sums.items() if recorded[p] != v]  # every leaf at its saved dtype: no second pass
  missing = [prefix + p for p in flat if prefix + p not in recorded]
  comparable = {}
  for p, x in flat.items():
    want = recorded.get(prefix + p)
    if want is None:
      continue
    saved = jnp.dtype(want.split(":", 1)[0])
    if saved == x.dtype:
      comparable[p] = x
    elif saved.itemsize < jnp.dtype(x.dtype).itemsize:
      comparable[p] = x.astype(saved)
  got = checksums(comparable, prefix)
  return missing + [p for p, v in got.items() if recorded[p] != v]
