"""Shrinking the expert table: `prune_experts` keeps the most salient experts of each MoE layer.

    prune_experts(cfg, num_experts=4, saliency="frequency", scores={layer: [E scores]})

Which experts stay is decided by a saliency measured elsewhere and passed in (`scores`): at a stage
boundary `moegrow.orchestrate.boundary` measures it on the stage's held-out batches with the source
model (`probes.expert_loads` for "frequency", `probes.reap_scores` for "reap"), the way it measures
`add_experts`' loads. "random" (seeded) and "list" (`keep`) are the ablations. The kept experts keep
their order; their expert weights, router columns and biases are sliced, and their Adam moments
(and EWC's Fisher) with them: every kept slice is bit-identical to its source. Not exact: the
growth certificate reports the loss change as measured.
"""
from __future__ import annotations

import functools
from typing import Any, Literal, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from moegrow.surgery import rules as R
from moegrow.surgery.moe_ops import _refuse_ramped
from moegrow.surgery.op import (Layers, Plan, expert_counts, growth_op, mlp_names, moe_fields, resolve_counts,
                                resolve_layers)

SALIENCIES = ("frequency", "reap", "random", "list")


@growth_op
def prune_experts(cfg, *, num_experts: int | Sequence[int] | Mapping[Any, int], layers: Layers | Literal["moe"] = "moe",
                  saliency: Literal["frequency", "reap", "random", "list"] = "frequency",
                  scores: Mapping[Any, Any] | None = None, keep: Mapping[Any, Any] | None = None,
                  seed: int = 0, top_k: int | None = None) -> Plan:
  """Keep `num_experts` (an int, a sequence per layer, or {layer: count}) of each MoE layer's experts.

  saliency:
    frequency  the experts the router selects most often: `scores[layer]` = each expert's fraction
               of the token-expert assignments (`probes.expert_loads`);
    reap       REAP (Lasby et al. 2025, eq. 4): `scores[layer][e]` = the mean, over the tokens routed
               to e, of gate_e(x) * ||y_e(x)|| (`probes.reap_scores`);
    random     a seeded random subset (`seed`, per layer);
    list       `keep[layer]`, the experts to keep.
  The highest scores stay (ties: the lower index); kept experts keep their relative order.
  top_k: the new top_k (default: the model's); a layer left with fewer experts than top_k is
  refused, naming it. Moments and Fisher: the kept experts' own.
  """
  _refuse_ramped(cfg, "prune_experts")
  counts = _pruned_counts(cfg, layers, num_experts)
  k = cfg.top_k if top_k is None else top_k
  small = {i: e for i, e in counts.items() if e < k}
  if small:
    raise ValueError(f"prune_experts: layer(s) {sorted(small)} would keep {sorted(set(small.values()))} expert(s), "
                     f"fewer than top_k={k}; give top_k=<at most {min(small.values())}> to route to fewer")
  if cfg.routing != "token_choice":
    raise ValueError(f"prune_experts: routing={cfg.routing!r}; pruning by routed tokens needs token_choice routing")
  kept, missing = _kept_experts(cfg, counts, saliency, scores, keep, seed)
  new_cfg = cfg.replace(top_k=int(k), **moe_fields({**expert_counts(cfg), **counts}, cfg.num_layers))

  def rules(key):
    if missing:
      need = "keep={layer: [experts]}" if saliency == "list" else "scores={layer: vector of experts}"
      raise ValueError(f"prune_experts: saliency={saliency!r} needs {need} for layers {missing}")
    out = []
    for i, idx in kept.items():
      out.extend(_prune_rules(cfg, i, idx))
    return out + [(".*", R.copy())]

  note = (f"kept by {saliency}: the certificate shows the loss change of dropping "
          f"{sum(cfg.experts_in_layer(i) - e for i, e in counts.items())} expert(s)")
  return Plan(new_cfg, rules, exact=False, note=note, extra={"kept": {str(i): v.tolist() for i, v in kept.items()}})


def _pruned_counts(cfg, layers, num_experts) -> dict[int, int]:
  """{MoE layer: experts kept}; ValueError for dense layers, no MoE layer, or a count out of 1..E."""
  ids = resolve_layers(cfg, layers, "prune_experts")
  dense = [i for i in ids if not cfg.experts_in_layer(i)]
  if dense:
    raise ValueError(f"prune_experts: layer(s) {dense} are dense (no experts)")
  if not ids:
    raise ValueError("prune_experts: the model has no MoE layers")
  counts = resolve_counts(num_experts, ids, "prune_experts")
  for i, e2 in counts.items():
    if not 1 <= e2 <= cfg.experts_in_layer(i):
      raise ValueError(f"prune_experts: layer {i} has {cfg.experts_in_layer(i)} experts; cannot keep {e2} "
                       f"(1..{cfg.experts_in_layer(i)}; add_experts grows)")
  return counts


def _kept_experts(cfg, counts: dict[int, int], saliency: str, scores, keep, seed: int):
  """({layer: sorted indices of the kept experts}, layers whose scores or list are missing)."""
  kept, missing = {}, []
  for i, e2 in counts.items():
    e = cfg.experts_in_layer(i)
    if saliency == "random":
      kept[i] = np.sort(np.random.default_rng([seed, i]).permutation(e)[:e2])
      continue
    given = scores if saliency in ("frequency", "reap") else keep
    v = None if given is None else given.get(str(i), given.get(i))
    if v is None:
      missing.append(i)
      continue
    if saliency == "list":
      idx = np.asarray(v, np.int64)
      if idx.ndim != 1 or len(idx) != e2 or len(set(idx.tolist())) != e2 or not all(0 <= j < e for j in idx):
        raise ValueError(f"prune_experts: keep[{i}]={list(v)} must be {e2} distinct experts of 0..{e - 1}")
      kept[i] = np.sort(idx)
      continue
    if np.shape(v) != (e,) or not np.all(np.isfinite(np.asarray(v, np.float64))):
      raise ValueError(f"prune_experts: scores for layer {i} must be {e} finite numbers (got shape {np.shape(v)})")
    order = np.argsort(-np.asarray(v, np.float64), kind="stable")  # highest first, ties: lower index
    kept[i] = np.sort(order[:e2])
  return kept, missing


def _prune_rules(cfg, i: int, idx: np.ndarray):
  """Slice layer i's expert tables (axis 0), router columns (axis 1) and bias to the experts `idx`,
  for params, moments and Fisher alike."""
  def take(kind, kk, w, axis):
    return jnp.take(w, jnp.asarray(idx), axis=axis)

  p = f"blocks/{i}/mlp/"
  rules = [(p + f"{nm}_EDF", R.compute([p + f"{nm}_EDF"], functools.partial(take, axis=0), "prune_experts"))
           for nm in mlp_names(cfg)]
  return rules + [
      (p + "wo_EFD", R.compute([p + "wo_EFD"], functools.partial(take, axis=0), "prune_experts")),
      (p + "router_DE", R.compute([p + "router_DE"], functools.partial(take, axis=1), "prune_experts")),
      (p + "router_bias_E", R.compute([p + "router_bias_E"], functools.partial(take, axis=0), "prune_experts"))]
