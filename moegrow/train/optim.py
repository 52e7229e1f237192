"""Optimizer: AdamW with warm-up + cosine/constant schedule, clipping, freezing masks.

Growth needs the Adam moments as plain param-shaped trees: `adam_moments(opt_state)` pulls
them out, `with_adam_moments(template, moments)` puts grown ones into a freshly initialised
state of the new shapes (every other piece of state, e.g. schedule counts, is carried by `count`).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax


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
    raise ValueError(f"train.schedule={schedule!r}: expected 'cosine', 'constant' or 'rsqrt'")
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


def schedule_from(train_cfg: Any) -> optax.Schedule:
  """`make_schedule` from a train config (lr, steps, warmup_steps, schedule, min_lr_ratio)."""
  return make_schedule(train_cfg.lr, train_cfg.steps, train_cfg.warmup_steps, train_cfg.schedule,
                       train_cfg.get("min_lr_ratio", 0.1))


def make_optimizer(train_cfg: Any, params: dict | None = None,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """AdamW chain from a config with lr, steps, warmup_steps, schedule, min_lr_ratio, b1, b2,
  weight_decay, grad_clip and optional `frozen` (regexes over param paths, no updates).
  `schedule` defaults to `schedule_from(train_cfg)`."""
  sched = schedule_from(train_cfg) if schedule is None else schedule
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip else optax.identity(),
      optax.adamw(sched, b1=train_cfg.b1, b2=train_cfg.b2, eps=1e-8,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask),
  )
  frozen = tuple(train_cfg.get("frozen", ()) or ())
  if frozen:
    if params is None:
      raise ValueError("make_optimizer: `params` are needed to build the frozen mask")
    mask = frozen_mask(params, frozen)
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", mask)
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def _is_adam(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def adam_moments(opt_state) -> dict:
  """{'mu', 'nu', 'count'} of the (single) Adam state inside an optax state."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one Adam state in the optimizer state, found {len(found)}")
  s = found[0]
  return {"mu": s.mu, "nu": s.nu, "count": s.count}


def with_adam_moments(opt_state, mu, nu, count):
  """`opt_state` with its Adam moments replaced and every step counter set to `count`."""
  def swap(x):
    if _is_adam(x):
      return x._replace(mu=mu, nu=nu, count=jnp.asarray(count, x.count.dtype))
    return x
  state = jax.tree_util.tree_map(swap, opt_state, is_leaf=_is_adam)
  # Schedule counters (ScaleByScheduleState and friends) follow the step.
  def set_counts(path, leaf):
    names = [getattr(p, "name", "") for p in path]
    if names and names[-1] == "count" and hasattr(leaf, "dtype"):
      return jnp.asarray(count, leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(set_counts, state)
