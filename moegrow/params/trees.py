"""Plain nested-dict trees: the one format params, moments, reports and configs share.

A tree is a nested dict with string keys; a leaf's path is its keys joined by '/'
(`blocks/1/mlp/wact_EDF`). Everything above the model (surgery, checkpoints, training) sees
parameters this way.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

SEP = "/"


def flatten(tree: Mapping, sep: str = SEP) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Keys must be strings without `sep`; None leaves are kept.
  An already flat {path: leaf} dict (no Mapping values) is returned as a copy."""
  out: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      if not isinstance(k, str) or sep in k or not k:
        raise ValueError(f"flatten: key {k!r} under '{prefix}' must be a non-empty str without {sep!r}")
      path = f"{prefix}{sep}{k}" if prefix else k
      if isinstance(v, Mapping):
        walk(v, path)
      else:
        out[path] = v

  if all(not isinstance(v, Mapping) for v in tree.values()):
    return dict(tree)
  walk(tree, "")
  return out


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict:
  """Inverse of `flatten`."""
  out: dict = {}
  for path, v in flat.items():
    *parents, last = path.split(sep)
    node = out
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"unflatten: '{path}' is below a leaf")
    if last in node:
      raise ValueError(f"unflatten: '{path}' given twice or is a prefix of another path")
    node[last] = v
  return out


def natural_key(path: str):
  """Sort key with numbers compared as numbers: blocks/2 < blocks/10."""
  return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in re.split(r"(\d+)", path)]


def to_plain(tree: Any, leaf: Callable[[Any], Any] = lambda x: x, sequences: bool = True) -> Any:
  """Any mapping (dict, ConfigDict, nnx.State) -> dict with str keys; lists/tuples -> lists
  (kept as leaves with sequences=False); other values through `leaf`.
  `to_plain(x, json_leaf)` makes x JSON-serialisable."""
  if hasattr(tree, "items") and not hasattr(tree, "shape"):
    return {str(k): to_plain(v, leaf, sequences) for k, v in tree.items()}
  if sequences and isinstance(tree, (list, tuple)):
    return [to_plain(v, leaf, sequences) for v in tree]
  return leaf(tree)


def json_leaf(x: Any) -> Any:
  """Arrays and numpy scalars -> nested lists / Python scalars, anything else unchanged."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return np.asarray(x).tolist()
  return x


def check_tree(tree: Mapping, abstract: Mapping, what: str = "tree", check_dtype: bool = True) -> None:
  """ValueError listing missing, unexpected and mis-shaped (or mis-typed) leaves of `tree`
  against `abstract` (nested or flat; leaves need `.shape` and, with check_dtype, `.dtype`)."""
  have, want = flatten(tree), flatten(abstract)
  problems = []
  missing = sorted(set(want) - set(have), key=natural_key)
  extra = sorted(set(have) - set(want), key=natural_key)
  if missing:
    problems.append(f"missing leaves: {missing}")
  if extra:
    problems.append(f"unexpected leaves: {extra}")
  for p in sorted(set(want) & set(have), key=natural_key):
    h, w = have[p], want[p]
    shape_ok = tuple(h.shape) == tuple(w.shape)
    dtype_ok = not check_dtype or np.dtype(h.dtype) == np.dtype(w.dtype)
    if not (shape_ok and dtype_ok):
      got = f"{tuple(h.shape)}" + (f" {np.dtype(h.dtype)}" if check_dtype else "")
      exp = f"{tuple(w.shape)}" + (f" {np.dtype(w.dtype)}" if check_dtype else "")
      problems.append(f"{p}: got {got}, want {exp}")
  if problems:
    raise ValueError(f"{what} does not match the expected tree:\n  " + "\n  ".join(problems))
