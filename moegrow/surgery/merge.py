"""Weight merging: pure functions on N params-shaped trees of one architecture.

    merge(method, models, base=None, *, overrides=(), key=None, **params) -> merged tree

Methods (formulas and defaults as mergekit's `merge_methods`; tau_i = theta_i - theta_base):
  linear           sum_i w_i theta_i / sum_i w_i                     (model soups, Wortsman et al. 2022)
  task_arithmetic  theta_base + lam sum_i w_i tau_i                  (Ilharco et al. 2023, eq. 1)
  ties             trim each tau_i to its top-`density` magnitudes, elect the sign of sum_i w_i tau_i,
                   mean of the agreeing entries (normalised by their weights)   (Yadav et al. 2023, sec. 3)
  dare_linear      tau_i dropped entrywise with prob 1 - density, rescaled by 1/density, then
                   task arithmetic                                    (Yu et al. 2024, eq. 2)
  dare_ties        DARE's drop and rescale, then TIES' sign election and disjoint mean
  slerp            two models, spherical interpolation at `t` per tensor; lerp when nearly colinear
  model_stock      t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the tau_i,
                   theta = t mean_i theta_i + (1 - t) theta_base       (Jang et al. 2024, eq. 4)
Trees must match exactly (paths, shapes, dtypes): any mismatch is a ValueError naming the path.
Arithmetic is in float32; each leaf comes back in its own dtype. `overrides` is a list of
(path regex, {param: value}) applied per leaf, first match wins (e.g. a different `t` for
attention). Random methods are deterministic given `key` (folded per leaf path and model).
No model, mesh or checkpoint is imported: callers restore and save.
"""
from __future__ import annotations

import functools
import re
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from moegrow.params.trees import flatten, unflatten

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock")
# Defaults per method (mergekit's): weights 1 per model; normalize (divide by the weights' sum).
DEFAULTS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"lam": 1.0, "normalize": False},
    "ties": {"density": 1.0, "lam": 1.0, "normalize": True},
    "dare_linear": {"density": 1.0, "lam": 1.0, "normalize": False, "rescale": True},
    "dare_ties": {"density": 1.0, "lam": 1.0, "normalize": False, "rescale": True},
    "slerp": {"t": 0.5},
    "model_stock": {},
}
DOT_THRESHOLD = 0.9995  # |cos| above this: the two tensors are colinear, slerp falls back to lerp
EPS = 1e-8


def check_models(models: Sequence[Mapping], base: Mapping | None = None) -> list[dict[str, Any]]:
  """Flattened trees, after checking they share paths, shapes and dtypes (ValueError naming them)."""
  if not models:
    raise ValueError("merge: no models")
  flat = [flatten(m) for m in models]
  named = [(f"model {i}", f) for i, f in enumerate(flat)] + ([("base", flatten(base))] if base is not None else [])
  ref_name, ref = named[0]
  for name, f in named[1:]:
    missing, extra = sorted(set(ref) - set(f)), sorted(set(f) - set(ref))
    if missing or extra:
      raise ValueError(f"merge: {name} differs from {ref_name} in its parameters: missing {missing[:5]}, "
                       f"extra {extra[:5]}")
    for p in ref:
      a, b = ref[p], f[p]
      if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"merge: {p} has shape {tuple(b.shape)} in {name} but {tuple(a.shape)} in {ref_name}")
      if jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
        raise ValueError(f"merge: {p} has dtype {jnp.dtype(b.dtype)} in {name} but {jnp.dtype(a.dtype)} in "
                         f"{ref_name}")
  return flat


def check_params(method: str, p: Mapping[str, Any], n: int, path: str) -> dict[str, Any]:
  """One leaf's params, checked in Python (before tracing); weights become a tuple of floats."""
  p = dict(p)
  weights = p.get("weights")
  p["weights"] = tuple(float(w) for w in (weights if weights is not None else [1.0] * n))
  if len(p["weights"]) != n:
    raise ValueError(f"merge: {method} at {path}: {len(p['weights'])} weights for {n} models")
  if p.get("normalize") and abs(sum(p["weights"])) < EPS:
    raise ValueError(f"merge: {method} at {path}: weights {list(p['weights'])} sum to 0 and cannot be normalised")
  if "density" in p and not 0.0 < float(p["density"]) <= 1.0:
    raise ValueError(f"merge: {method} at {path}: density={p['density']} must be in (0, 1]")
  if method == "slerp" and n != 2:
    raise ValueError(f"merge: slerp takes exactly 2 models, got {n}")
  return p


def _bcast(w_N, x_N):
  return w_N.reshape((-1,) + (1,) * (x_N.ndim - 1))


def magnitude_mask(tau, density: float):
  """Keep the top `density` fraction of |tau| entries of one tensor (TIES' trim)."""
  if density >= 1.0:
    return jnp.ones(tau.shape, bool)
  k = int(density * tau.size)
  if k <= 0:
    return jnp.zeros(tau.shape, bool)
  flat = jnp.abs(tau).reshape(-1)
  threshold = jnp.sort(flat)[-k]
  return jnp.abs(tau) >= threshold


def _random_mask(key, shape, density: float):
  return jax.random.bernoulli(key, density, shape) if density < 1.0 else jnp.ones(shape, bool)


def _consensus(tau_N, w_N, normalize: bool):
  """TIES: elect the sign of the weighted sum, keep entries of that sign, mean (or sum) them."""
  wt_N = tau_N * _bcast(w_N, tau_N)
  sign = jnp.sign(jnp.sum(wt_N, axis=0))
  agree_N = jnp.sign(tau_N) == sign
  total = jnp.sum(jnp.where(agree_N, wt_N, 0.0), axis=0)
  if not normalize:
    return total
  divisor = jnp.sum(jnp.where(agree_N, _bcast(w_N, tau_N), 0.0), axis=0)
  return total / jnp.where(jnp.abs(divisor) < EPS, 1.0, divisor)


def slerp_tensor(a, b, t: float):
  """Spherical interpolation of two tensors seen as vectors; lerp when |cos| > DOT_THRESHOLD."""
  a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
  na, nb = a32 / jnp.maximum(jnp.linalg.norm(a32), EPS), b32 / jnp.maximum(jnp.linalg.norm(b32), EPS)
  dot = jnp.sum(na * nb)
  theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
  sin = jnp.sin(theta)
  s0 = jnp.where(jnp.abs(dot) > DOT_THRESHOLD, 1.0 - t, jnp.sin((1.0 - t) * theta) / jnp.where(sin == 0, 1.0, sin))
  s1 = jnp.where(jnp.abs(dot) > DOT_THRESHOLD, t, jnp.sin(t * theta) / jnp.where(sin == 0, 1.0, sin))
  return s0 * a32 + s1 * b32


def model_stock_t(tau_N) -> jax.Array:
  """t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors (Jang et al.
  2024, eq. 4); N = 2 is their two-model case."""
  n = tau_N.shape[0]
  v = tau_N.reshape(n, -1)
  v = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), EPS)
  cos_NN = v @ v.T
  cos = (jnp.sum(cos_NN) - jnp.trace(cos_NN)) / (n * (n - 1))
  return n * cos / (1.0 + (n - 1) * cos)


def merge_leaf(method: str, xs, base, p: Mapping[str, Any], key) -> jax.Array:
  """One leaf: `xs` the models' arrays, `base` the base's (or None), `p` the method's params
  (checked by `check_params`). Traceable: `merge` runs it under jax.jit."""
  dtype = xs[0].dtype
  x_N = jnp.stack([x.astype(jnp.float32) for x in xs])
  n = x_N.shape[0]
  w = jnp.asarray(p["weights"], jnp.float32)
  if method == "slerp":
    return slerp_tensor(xs[0], xs[1], float(p["t"])).astype(dtype)
  if method == "linear":
    out = jnp.sum(x_N * _bcast(w, x_N), axis=0)
    return (out / jnp.sum(w) if p["normalize"] else out).astype(dtype)
  b = base.astype(jnp.float32)
  tau_N = x_N - b
  if method == "model_stock":
    t = model_stock_t(tau_N) if n > 1 else jnp.float32(1.0)
    return (t * jnp.mean(x_N, axis=0) + (1.0 - t) * b).astype(dtype)
  density = float(p.get("density", 1.0))
  if method == "ties":
    tau_N = jnp.stack([jnp.where(magnitude_mask(t, density), t, 0.0) for t in tau_N])
  elif method in ("dare_linear", "dare_ties"):
    keys = [jax.random.fold_in(key, i) for i in range(n)]
    tau_N = jnp.stack([jnp.where(_random_mask(k, t.shape, density), t, 0.0) for k, t in zip(keys, tau_N)])
    if p.get("rescale", True):
      tau_N = tau_N / density
  if method in ("ties", "dare_ties"):
    delta = _consensus(tau_N, w, p["normalize"])
  else:
    delta = jnp.sum(tau_N * _bcast(w, tau_N), axis=0)
    if p["normalize"]:
      delta = delta / jnp.sum(w)
  return (b + float(p.get("lam", 1.0)) * delta).astype(dtype)


def leaf_params(method: str, path: str, params: Mapping[str, Any], overrides) -> dict[str, Any]:
  """The method's defaults, then `params`, then the first override whose regex matches `path`."""
  out = dict(DEFAULTS[method], **params)
  for pattern, values in overrides or ():
    if re.search(pattern, path):
      out.update(values)
      break
  return out


def merge(method: str, models: Sequence[Mapping], base: Mapping | None = None, *, overrides=(), key=None,
          **params) -> dict:
  """Merge `models` (params trees of one architecture) with `method` (see the module docstring);
  `params` are the method's (weights, lam, density, t, normalize, rescale). Returns a new tree."""
  if method not in METHODS:
    raise ValueError(f"merge: unknown method {method!r}; known: {METHODS}")
  if method in NEEDS_BASE and base is None:
    raise ValueError(f"merge: {method} needs a base model")
  known = set(DEFAULTS[method]) | {"weights"}
  for pattern, values in [(None, params)] + list(overrides or ()):
    unknown = sorted(set(values) - known)
    if unknown:
      where = "" if pattern is None else f" (override {pattern!r})"
      raise ValueError(f"merge: {method} has no parameter(s) {unknown}{where}; it takes {sorted(known)}")
  flat = check_models(models, base)
  flat_base = flatten(base) if base is not None else None
  key = jax.random.key(0) if key is None else key
  per_leaf = tuple((path, tuple(sorted(check_params(method, leaf_params(method, path, params, overrides), len(flat),
                                                   path).items())))
                   for path in flat[0])
  return unflatten(_merge_tree(method, per_leaf, flat, flat_base, key))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_tree(method: str, per_leaf, flat, flat_base, key) -> dict:
  out = {}
  for path, items in per_leaf:
    k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    out[path] = merge_leaf(method, [f[path] for f in flat], None if flat_base is None else flat_base[path],
                           dict(items), k)
  return out


def greedy_soup(ingredients: Sequence[Mapping], loss_fn) -> tuple[dict, list[dict]]:
  """Greedy soup (Wortsman et al. 2022, recipe 1): sort ingredients by held-out loss, then add
  each to the soup (a uniform average) only if the soup's held-out loss does not get worse.
  `loss_fn(tree) -> float` is measured by the caller. Returns (soup, trace), the trace one row
  per ingredient: its index, its own loss, the candidate soup's loss and whether it was added."""
  if not ingredients:
    raise ValueError("greedy_soup: no ingredients")
  check_models(ingredients)
  own = [float(loss_fn(x)) for x in ingredients]
  order = sorted(range(len(ingredients)), key=lambda i: own[i])
  members, best = [order[0]], own[order[0]]
  trace = [{"ingredient": order[0], "loss": own[order[0]], "soup_loss": best, "added": True}]
  for i in order[1:]:
    candidate = merge("linear", [ingredients[j] for j in members + [i]])
    loss = float(loss_fn(candidate))
    added = loss <= best
    if added:
      members, best = members + [i], loss
    trace.append({"ingredient": i, "loss": own[i], "soup_loss": loss, "added": added})
  return merge("linear", [ingredients[j] for j in members]), trace
