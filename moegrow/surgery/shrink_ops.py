"""Shrinking the expert table: `prune_experts` keeps the most salient experts of each MoE layer,
`merge_experts` merges them into groups.

    prune_experts(cfg, num_experts=4, saliency="frequency", scores={layer: [E scores]})
    merge_experts(cfg, num_experts=4, grouping="output", features={layer: [E, n]}, usage={layer: [E]})

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
  new_cfg = _shrunk_config(cfg, counts, top_k, "prune_experts")
  if cfg.routing != "token_choice":
    raise ValueError(f"prune_experts: routing={cfg.routing!r}; pruning by routed tokens needs token_choice routing")
  kept, missing = _kept_experts(cfg, counts, saliency, scores, keep, seed)

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


def _pruned_counts(cfg, layers, num_experts, op: str = "prune_experts") -> dict[int, int]:
  """{MoE layer: experts kept}; ValueError for dense layers, no MoE layer, or a count out of 1..E."""
  ids = resolve_layers(cfg, layers, op)
  dense = [i for i in ids if not cfg.experts_in_layer(i)]
  if dense:
    raise ValueError(f"{op}: layer(s) {dense} are dense (no experts)")
  if not ids:
    raise ValueError(f"{op}: the model has no MoE layers")
  counts = resolve_counts(num_experts, ids, op)
  for i, e2 in counts.items():
    if not 1 <= e2 <= cfg.experts_in_layer(i):
      raise ValueError(f"{op}: layer {i} has {cfg.experts_in_layer(i)} experts; cannot keep {e2} "
                       f"(1..{cfg.experts_in_layer(i)}; add_experts grows)")
  return counts


def _shrunk_config(cfg, counts: dict[int, int], top_k: int | None, op: str):
  """The config with the new expert counts and top_k (default: the model's); a layer left with
  fewer experts than top_k is refused, naming it."""
  k = cfg.top_k if top_k is None else top_k
  small = {i: e for i, e in counts.items() if e < k}
  if small:
    raise ValueError(f"{op}: layer(s) {sorted(small)} would keep {sorted(set(small.values()))} expert(s), "
                     f"fewer than top_k={k}; give top_k=<at most {min(small.values())}> to route to fewer")
  return cfg.replace(top_k=int(k), **moe_fields({**expert_counts(cfg), **counts}, cfg.num_layers))


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


def _expert_leaves(cfg) -> list[tuple[str, int, int | None]]:
  """(leaf, its expert axis, its hidden-unit axis or None) of every per-expert leaf of an MoE
  layer: the expert tables, router columns, router bias and loss-free selection bias."""
  return ([(f"{nm}_EDF", 0, 2) for nm in mlp_names(cfg)]
          + [("wo_EFD", 0, 1), ("router_DE", 1, None), ("router_bias_E", 0, None), ("selection_bias_E", 0, None)])


def _per_expert_rules(cfg, i: int, fn, name: str) -> list:
  """Rules making each per-expert leaf of layer i by `fn(kind, key, w, axis=, hidden=)` of its
  source (the same leaf), for params, moments and Fisher alike."""
  p = f"blocks/{i}/mlp/"
  return [(p + leaf, R.compute([p + leaf], functools.partial(fn, axis=axis, hidden=hidden), name))
          for leaf, axis, hidden in _expert_leaves(cfg)]


def _prune_rules(cfg, i: int, idx: np.ndarray):
  """Slice layer i's expert tables (axis 0), router columns (axis 1) and biases to the experts
  `idx`, for params, moments and Fisher alike."""
  def take(kind, kk, w, axis, hidden):
    return jnp.take(w, jnp.asarray(idx), axis=axis)
  return _per_expert_rules(cfg, i, take, "prune_experts")


# ---------------------------------------------------------------- merging experts

@growth_op
def merge_experts(cfg, *, num_experts: int | Sequence[int] | Mapping[Any, int], layers: Layers | Literal["moe"] = "moe",
                  grouping: Literal["output", "router", "list"] = "output", features: Mapping[Any, Any] | None = None,
                  groups: Mapping[Any, Any] | None = None, usage: Mapping[Any, Any] | None = None,
                  align: bool = False, perms: Mapping[Any, Any] | None = None, top_k: int | None = None) -> Plan:
  """Merge each MoE layer's experts into `num_experts` groups.

  grouping (which experts go together):
    output  HC-SMoE (Chen et al. 2024): agglomerative clustering, average linkage on cosine
            distance, of `features[layer]` = each expert's mean output over the boundary's tokens;
    router  the same clustering of `features[layer]` = each expert's router logits over those
            tokens (MC-SMoE's routing-similarity grouping, Li et al. 2024);
    list    `groups[layer]`, a partition of the experts.
  Merged expert of group G, with u_e = usage[layer][e] / sum over G (uniform if all 0; usage is the
  fraction of assignments each expert receives, `probes.expert_loads`):
    weights (wact, wlin, wo), router column and bias  sum_e u_e w_e   (the usage-weighted mean)
    Adam moments and Fisher                           sum_e u_e m_e   (the same mean)
  align=True (MC-SMoE's permutation alignment): before the mean, each expert's hidden units are
  permuted by `perms[layer]` ([E, F]: row e lists, for each hidden unit of the reference, the unit
  of expert e matched to it), a reparametrisation that leaves every expert's function unchanged;
  `hidden_unit_perms` computes them by weight matching against the layer's most used expert, and a
  stage boundary does so from the source model. The moments and Fisher are permuted alike.
  Groups are ordered by their smallest expert. Exact for identical experts with renormalised gates
  (topk_softmax, sigmoid_topk): the certificate shows it; not exact in general.
  """
  _refuse_ramped(cfg, "merge_experts")
  counts = _pruned_counts(cfg, layers, num_experts, "merge_experts")
  new_cfg = _shrunk_config(cfg, counts, top_k, "merge_experts")
  parts, missing = _groups(cfg, counts, grouping, features, groups)
  weights = {i: _usage_weights(cfg, i, parts[i], usage) for i in parts}
  aligned = {i: _perms(cfg, i, perms) for i in counts} if align else {}

  def rules(key):
    if missing:
      need = "groups={layer: [[experts], ...]}" if grouping == "list" else "features={layer: [E, n] vectors}"
      raise ValueError(f"merge_experts: grouping={grouping!r} needs {need} for layers {missing}")
    absent = [i for i, p in aligned.items() if p is None]
    if absent:
      raise ValueError(f"merge_experts: align=True needs perms={{layer: [E, F] permutations}} for layers {absent} "
                       "(merge_experts.hidden_unit_perms; a stage boundary measures them)")
    out = []
    for i in parts:
      out.extend(_merge_rules(cfg, i, weights[i], aligned.get(i)))
    return out + [(".*", R.copy())]

  return Plan(new_cfg, rules, exact=False, note=f"experts merged by {grouping}: usage-weighted means of each group",
              extra={"groups": {str(i): [[int(e) for e in g] for g in p] for i, p in parts.items()}})


def _groups(cfg, counts: dict[int, int], grouping: str, features, groups):
  """({layer: groups of experts, ordered by their smallest}, layers lacking their input)."""
  parts, missing = {}, []
  for i, e2 in counts.items():
    e = cfg.experts_in_layer(i)
    given = groups if grouping == "list" else features
    v = None if given is None else given.get(str(i), given.get(i))
    if v is None:
      missing.append(i)
      continue
    if grouping == "list":
      p = [sorted(int(x) for x in g) for g in v]
      if len(p) != e2 or sorted(x for g in p for x in g) != list(range(e)) or any(not g for g in p):
        raise ValueError(f"merge_experts: groups[{i}]={v} must split experts 0..{e - 1} into {e2} non-empty groups")
    else:
      f = np.asarray(v, np.float64)
      if f.ndim != 2 or f.shape[0] != e or not np.all(np.isfinite(f)):
        raise ValueError(f"merge_experts: features for layer {i} must be {e} finite vectors (got shape {f.shape})")
      p = cluster(f, e2)
    parts[i] = sorted(p, key=min)
  return parts, missing


def cluster(features_EN: np.ndarray, n: int) -> list[list[int]]:
  """Agglomerative clustering of the rows into n groups: average linkage on cosine distance; ties
  merge the pair of lowest indices first (deterministic)."""
  unit = features_EN / np.maximum(np.linalg.norm(features_EN, axis=1, keepdims=True), 1e-12)
  dist = 1.0 - unit @ unit.T
  groups = [[e] for e in range(len(features_EN))]
  while len(groups) > n:
    best = None
    for a in range(len(groups)):
      for b in range(a + 1, len(groups)):
        d = float(np.mean(dist[np.ix_(groups[a], groups[b])]))
        if best is None or d < best[0] - 1e-12:
          best = (d, a, b)
    _, a, b = best
    groups[a] = sorted(groups[a] + groups[b])
    del groups[b]
  return groups


def _usage_weights(cfg, i: int, parts: list[list[int]], usage) -> np.ndarray:
  """[E', E] merge matrix: row g holds group g's usage-weighted mean coefficients."""
  e = cfg.experts_in_layer(i)
  u = None if usage is None else usage.get(str(i), usage.get(i))
  u = np.ones(e) if u is None else np.asarray(u, np.float64)
  if u.shape != (e,) or np.any(u < 0) or not np.all(np.isfinite(u)):
    raise ValueError(f"merge_experts: usage for layer {i} must be {e} finite numbers >= 0 (got {np.shape(u)})")
  m = np.zeros((len(parts), e))
  for g, members in enumerate(parts):
    w = u[members] if u[members].sum() > 0 else np.ones(len(members))
    m[g, members] = w / w.sum()
  return m


def _perms(cfg, i: int, perms) -> np.ndarray | None:
  """Layer i's [E, F] hidden-unit permutations from `perms` (None if not given)."""
  v = None if perms is None else perms.get(str(i), perms.get(i))
  if v is None:
    return None
  e, f = cfg.experts_in_layer(i), cfg.expert_d_ff
  p = np.asarray(v)
  if p.shape != (e, f) or any(sorted(row.tolist()) != list(range(f)) for row in p):
    raise ValueError(f"merge_experts: perms[{i}] must be {e} permutations of 0..{f - 1} (got shape {p.shape})")
  return p.astype(np.int32)


def hidden_unit_perms(wact_EDF, wlin_EDF, wo_EFD, reference: int) -> np.ndarray:
  """[E, F] permutations aligning every expert's hidden units to expert `reference`'s by weight
  matching (MC-SMoE; Ainsworth et al. 2023): for expert e, the assignment of its units to the
  reference's that maximises sum_f <wact_r[:, f], wact_e[:, p(f)]> + <wlin ...> + <wo_r[f], wo_e[p(f)]>
  (Hungarian algorithm). Row `reference` is the identity."""
  from scipy.optimize import linear_sum_assignment
  mats = [np.asarray(wact_EDF, np.float64)] + ([] if wlin_EDF is None else [np.asarray(wlin_EDF, np.float64)])
  units_EFX = np.concatenate([np.swapaxes(m, 1, 2) for m in mats] + [np.asarray(wo_EFD, np.float64)], axis=2)
  out = []
  for e in range(units_EFX.shape[0]):
    sim_FF = units_EFX[reference] @ units_EFX[e].T  # [reference unit, expert e's unit]
    _, cols = linear_sum_assignment(sim_FF, maximize=True)
    out.append(cols)
  return np.asarray(out, np.int32)


def _merge_rules(cfg, i: int, m_GE: np.ndarray, perms_EF: np.ndarray | None = None):
  """Layer i's expert tables (axis 0), router columns (axis 1) and biases as usage-weighted group
  means, for params, moments and Fisher alike; with `perms_EF` each expert's hidden units (the F
  axis) are permuted first."""
  def mix(kind, kk, w, axis, hidden):
    if perms_EF is not None and hidden is not None:
      idx = jnp.asarray(perms_EF)[:, None, :] if hidden == 2 else jnp.asarray(perms_EF)[:, :, None]
      w = jnp.take_along_axis(w, idx, axis=hidden)
    out = jnp.tensordot(jnp.asarray(m_GE, jnp.float32), jnp.moveaxis(w.astype(jnp.float32), axis, 0), axes=1)
    return jnp.moveaxis(out, 0, axis).astype(w.dtype)
  return _per_expert_rules(cfg, i, mix, "merge_experts")
