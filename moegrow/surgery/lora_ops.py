"""LoRA adapters as growth ops: `add_lora` (exact: B = 0) and `merge_lora` (folds them in).

    add_lora(cfg, rank=8, lora_alpha=16.0, targets=None)  params['lora'] appears: A ~ N(0, 1/in), B = 0
    merge_lora(cfg)                                     W <- W + (lora_alpha / r) A B; params['lora'] goes
    merge_adapters(method, base, adapters, lora_alpha)  several adapters combined by a merge method
Both are exact: `merge_lora`'s weights are the very sums `moegrow.model.transformer.apply` forms
from the adapters (same float32 arithmetic, same cast), so logits are bit-identical. Other growth
ops refuse a model that carries adapters (merge them first): they would need rules for every
adapter of every weight they reshape. Adapter math: `moegrow.params.lora`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from moegrow.config import LORA_TARGETS
from moegrow.params import lora
from moegrow.surgery import merge as merge_ops
from moegrow.surgery import rules as R
from moegrow.surgery.op import Plan, growth_op


def _a_init() -> R.Action:
  """A [E, in, r] ~ N(0, 1/in) (the model's fan-in scale); zero moments."""
  def fn(kind, key, srcs, want):
    if kind != "params":
      return jnp.zeros(want.shape, want.dtype)
    return (jax.random.normal(key, want.shape, jnp.float32) / jnp.sqrt(want.shape[1])).astype(want.dtype)
  return R.Action("init:lora_A", (), fn)


@growth_op
def add_lora(cfg, *, rank: int, lora_alpha: float = 16.0, targets: Sequence[str] | None = None) -> Plan:
  """Adapters on every weight matched by `targets` (default: attention q/k/v/o and dense, shared
  and expert MLP weights; one A, B per expert). Exact: B starts at 0."""
  if cfg.lora_rank:
    raise ValueError(f"add_lora: the model already carries adapters (lora_rank={cfg.lora_rank}); "
                     "fold them in with merge_lora first")
  if rank < 1:
    raise ValueError(f"add_lora: rank={rank} must be >= 1")
  new_cfg = cfg.replace(lora_rank=int(rank), lora_alpha=float(lora_alpha), lora_targets=tuple(targets or LORA_TARGETS))

  def rules(key):
    return [(r"lora/.+/A", _a_init()), (r"lora/.+/B", R.init("zeros")), (".*", R.copy())]

  return Plan(new_cfg, rules, exact=True, note="B = 0: the adapters add nothing until trained")


@growth_op
def merge_lora(cfg) -> Plan:
  """Fold the adapters into their weights and drop them: an ordinary checkpoint of the same model.
  Moments: each weight keeps its own (a frozen base has none); the adapters' are dropped."""
  if not cfg.lora_rank:
    raise ValueError("merge_lora: the model carries no adapters (lora_rank=0)")
  scale = cfg.lora_alpha / cfg.lora_rank

  def fold(kind, key, w, a, b):
    if kind != "params":
      return w
    return (w.astype(jnp.float32) + scale * lora.delta("", w, a, b)).astype(w.dtype)

  def rules(key):
    return ([(t, R.compute([r"\g<0>", r"lora/\g<0>/A", r"lora/\g<0>/B"], fold, "merge_lora"))
             for t in cfg.lora_targets] + [(".*", R.copy())])

  base = cfg.replace(lora_rank=0, lora_alpha=16.0, lora_targets=LORA_TARGETS)
  return Plan(base, rules, exact=True, note="the merged weights are the sums the adapter model computes")


def merge_adapters(method: str, base: Mapping, adapters: Sequence[Mapping],
                   lora_alpha: float | Sequence[float], *,
                   key=None, **params) -> dict:
  """Combine adapters trained on one base (task arithmetic on adapters): each adapter set is a
  task vector tau_i = (lora_alpha_i / r_i) A_i B_i on its weights (zero elsewhere), and `method` (any
  of `moegrow.surgery.merge.METHODS` that takes a base, e.g. task_arithmetic, ties, dare_ties)
  merges the models base + tau_i. Returns plain params (no adapters). The adapters' product, not
  A and B separately, is merged: sum_i A_i B_i is not (sum_i A_i)(sum_i B_i)."""
  if not adapters:
    raise ValueError("merge_adapters: no adapters given")
  alphas = ([float(lora_alpha)] * len(adapters) if isinstance(lora_alpha, (int, float))
            else [float(a) for a in lora_alpha])
  if len(alphas) != len(adapters):
    raise ValueError(f"merge_adapters: {len(adapters)} adapter sets but {len(alphas)} lora_alpha values")
  if method not in merge_ops.NEEDS_BASE:
    raise ValueError(f"merge_adapters: {method!r} does not merge task vectors; use one of {merge_ops.NEEDS_BASE}")
  models = [lora.apply(base, ad, a) for ad, a in zip(adapters, alphas)]
  return merge_ops.merge(method, models, base, key=key, **params)
