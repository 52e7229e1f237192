"""Optimizer: AdamW with warm-up + cosine/constant schedule, clipping, freezing masks.

Growth needs the Adam moments as plain param-shaped trees: `adam_moments(opt_state)` pulls
them out, `with_adam_moments(template, moments)` puts grown ones into a freshly initialised
state of the new shapes (every other piece of state, e.g. schedule counts, is carried by `count`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moegrow.config import ModelConfig
from moegrow.params.trees import flatten, to_plain, unflatten
from moegrow.params import balance


SCHEDULES = ("cosine", "constant", "rsqrt")
RAMP_FROZEN = r"^ramp/"  # ramp masks (params['ramp'], moegrow.params.ramp): state advanced by the train step


def make_schedule(lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warm-up to `lr`, then: cosine decay to `min_lr_ratio * lr` at `steps`; constant; or
  "rsqrt", lr * sqrt(warmup / step), which has no fixed end, so continuations of any length (and
  growth stages) share the same learning rate at every step."""
  warmup_steps = min(warmup_steps, max(steps - 1, 0))
  if schedule == "constant":
    after = optax.constant_schedule(lr)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(steps - warmup_steps, 1), alpha=min_lr_ratio)
  elif schedule == "rsqrt":
    w = max(warmup_steps, 1)
    after = lambda count: lr * jax.lax.rsqrt((count + w) / w)  # join_schedules passes step - warmup
  else:
    raise ValueError(f"train.schedule={schedule!r}: expected one of {SCHEDULES}")
  if warmup_steps == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def decay_mask(params: dict) -> dict:
  """Weight decay on matrices only (not norm scales, router biases)."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def frozen_mask(params: dict, patterns: Sequence[str]) -> dict:
  """True for leaves whose '/'-joined path matches any regex in `patterns`."""
  def frozen(path, _):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return any(re.search(p, name) for p in patterns)
  return jax.tree_util.tree_map_with_path(frozen, params)


def slice_scales(params: dict, entries: Sequence[Mapping]) -> dict[str, list[tuple[int, np.ndarray]]]:
  """{param path: [(axis, scale vector along that axis), ...]} for slice entries
  {'path': regex, 'axis': int, 'start': int, 'stop': int, 'lr_scale': float (0 = frozen)}.
  Unmatched leaves are absent. ValueError naming the entry if its axis or range does not fit."""
  flat = flatten(params)
  out: dict[str, list[tuple[int, np.ndarray]]] = {}
  for n, e in enumerate(entries):
    rx = re.compile(e["path"])
    for path, x in flat.items():
      if not rx.search(path):
        continue
      axis = int(e.get("axis", 0))
      if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"train.frozen[{n}]: axis {axis} does not exist in {path} of shape {tuple(x.shape)}")
      axis %= x.ndim
      size = x.shape[axis]
      start, stop = int(e.get("start", 0)), int(e.get("stop", size))
      if not 0 <= start < stop <= size:
        raise ValueError(f"train.frozen[{n}]: range [{start}, {stop}) does not fit axis {axis} of {path} "
                         f"(size {size})")
      vec = np.ones((size,), np.float32)
      vec[start:stop] = float(e.get("lr_scale", 0.0))
      out.setdefault(path, []).append((axis, vec))
  return out


def scale_updates(scales: dict[str, list[tuple[int, np.ndarray]]]) -> optax.GradientTransformation:
  """Multiply the optimizer's FINAL updates by per-slice factors (a factor 0 gives an exact zero
  update, so a frozen slice stays bit-identical through weight decay and stale momentum, which
  masking the gradients would not guarantee). Stateless."""
  def update(updates, state, params=None):
    flat = flatten(updates)
    for path, pieces in scales.items():
      u = flat[path]
      for axis, vec in pieces:
        shape = [1] * u.ndim
        shape[axis] = -1
        s = jnp.asarray(vec, u.dtype).reshape(shape)
        u = jnp.where(s == 0, jnp.zeros_like(u), u * s)
      flat[path] = u
    return unflatten(flat), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def old_expert_slices(prev: ModelConfig, ops) -> tuple[dict, ...]:
  """Frozen-slice entries for every expert that existed before `ops`, with its router column and
  bias (Lifelong-MoE, Chen et al. 2023): the grown model trains only its new experts' slices
  (and every other parameter). Ops that move layers (insert_blocks, stack) are refused."""
  moved = [o["op"] for o in ops if o.get("op") in ("insert_blocks", "stack")]
  if moved:
    raise ValueError(f"freeze_old_experts: ops {moved} move layers; freeze slices explicitly with `frozen`")
  out = []
  for i in prev.moe_layer_ids:
    e = prev.experts_in_layer(i)
    out += [{"path": rf"^blocks/{i}/mlp/(wact|wlin|wo)_E[A-Z]*$", "axis": 0, "start": 0, "stop": e},
            {"path": rf"^blocks/{i}/mlp/router_DE$", "axis": 1, "start": 0, "stop": e},
            {"path": rf"^blocks/{i}/mlp/router_bias_E$", "axis": 0, "start": 0, "stop": e}]
  return tuple(out)


def schedule_from(train_cfg: Any) -> optax.Schedule:
  """`make_schedule` from a train config (lr, steps, warmup_steps, schedule, min_lr_ratio)."""
  return make_schedule(train_cfg.lr, train_cfg.steps, train_cfg.warmup_steps, train_cfg.schedule,
                       train_cfg.get("min_lr_ratio", 0.1))


def make_optimizer(train_cfg: Any, params: dict | None = None,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """AdamW chain from a config with lr, steps, warmup_steps, schedule, min_lr_ratio, b1, b2,
  weight_decay, grad_clip and optional `frozen`: regexes over param paths (whole leaves: no
  updates and no optimizer state) and slice entries {'path', 'axis', 'start', 'stop',
  'lr_scale' (default 0: frozen)} whose final updates are scaled (see `scale_updates`).
  Ramp masks (a 'ramp' subtree of `params`) and loss-free selection biases (`balance.FROZEN`) are
  always frozen whole leaves: the train step moves them, not the optimizer. `schedule` defaults to `schedule_from(train_cfg)`."""
  sched = schedule_from(train_cfg) if schedule is None else schedule
  entries = tuple(train_cfg.get("frozen", ()) or ())
  slices = [to_plain(e) for e in entries if hasattr(e, "items")]
  frozen = tuple(e for e in entries if isinstance(e, str))
  if params is not None and "ramp" in params:
    frozen += (RAMP_FROZEN,)
  if params is not None and any(re.search(balance.FROZEN, p) for p in flatten(params)):
    frozen += (balance.FROZEN,)
  if (slices or frozen) and params is None:
    raise ValueError("make_optimizer: `params` are needed to build the frozen mask")
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip else optax.identity(),
      optax.adamw(sched, b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-8,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask),
      scale_updates(slice_scales(params, slices)) if slices else optax.identity(),
  )
  if frozen:
    if params is None:
      raise ValueError("make_optimizer: `params` are needed to build the frozen mask")
    mask = frozen_mask(params, frozen)
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", mask)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def _is_adam(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def _masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def adam_moments(opt_state, params=None) -> dict:
  """{'mu', 'nu', 'count'} of the (single) Adam state inside an optax state. Frozen leaves have
  no moments (optax.MaskedNode): with `params` they come back as zeros of the param's shape."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one Adam state in the optimizer state, found {len(found)}")
  s = found[0]
  mu, nu = s.mu, s.nu
  if params is not None:
    fill = lambda m, p: jnp.zeros(p.shape, p.dtype) if _masked(m) else m
    mu = jax.tree_util.tree_map(fill, mu, params, is_leaf=_masked)
    nu = jax.tree_util.tree_map(fill, nu, params, is_leaf=_masked)
  return {"mu": mu, "nu": nu, "count": s.count}


def with_adam_moments(opt_state, mu, nu, count):
  """`opt_state` with its Adam moments replaced and every step counter set to `count`."""
  keep = lambda old, new: old if _masked(old) else new  # frozen leaves keep no moments

  def swap(x):
    if _is_adam(x):
      return x._replace(mu=jax.tree_util.tree_map(keep, x.mu, mu, is_leaf=_masked),
                        nu=jax.tree_util.tree_map(keep, x.nu, nu, is_leaf=_masked),
                        count=jnp.asarray(count, x.count.dtype))
    return x
  state = jax.tree_util.tree_map(swap, opt_state, is_leaf=_is_adam)
  # Schedule counters (ScaleByScheduleState and friends) follow the step.
  def set_counts(path, leaf):
    names = [getattr(p, "name", "") for p in path]
    if names and names[-1] == "count" and hasattr(leaf, "dtype"):
      return jnp.asarray(count, leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(set_counts, state)
