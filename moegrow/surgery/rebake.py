"""Distilled re-bake: MoE layers back into dense MLPs (`to_dense`), the starting point of a dense
student distilled from the frozen MoE; the way back from Branch-Train-MiX's mix (Sukhbaatar et
al. 2024). "MoE -> dense student; the student starts from the concatenation of the top experts by
routed load with 1/K scaling on their output projections." Maths, exactness and moments: the
docstring of `to_dense` and docs/growth.md.
"""
from __future__ import annotations

import functools
from typing import Any, Literal, Mapping

import jax.numpy as jnp
import numpy as np

from moegrow.config import fan_in_std
from moegrow.surgery import rules as R
from moegrow.surgery.op import Layers, Plan, expert_counts, growth_op, mlp_names, moe_fields, resolve_layers


def top_experts(load, k: int) -> list[int]:
  """The k experts of largest load, largest first; ties go to the lower index."""
  return [int(e) for e in np.argsort(-np.asarray(load, np.float64), kind="stable")[:k]]


@growth_op
def to_dense(cfg, *, layers: Layers | Literal["moe"] = "moe", mode: Literal["concat_topk", "average", "fresh"] =
             "concat_topk", k: int | None = None, loads: Mapping[Any, Any] | None = None) -> Plan:
  """MoE layers (default: all) -> dense MLPs. With s = expert_output_scale and experts y_e:

    concat_topk: the k (default top_k) experts of largest `loads[layer]` (a length-E vector, e.g.
                 the routed fraction from `train.probes.expert_loads`; ties: lower index first),
                 concatenated along F in that order, each wo scaled by s/k:
                 y = (s/k) sum_{j in top-k(loads)} y_j(x); d_ff = k*F.
    average:     wact, wlin, wo = the mean over the layer's experts (wo times s); d_ff = F.
    fresh:       a new dense MLP at the model's init (N(0, 1/fan_in)), width as concat_topk.
  Shared experts (ungated, always on) are folded in exactly, as more F columns with scale 1
  (d_ff grows by num_shared_experts * shared_d_ff), except in 'fresh' mode, which drops them.
  Router, router bias and the unused experts are dropped. d_ff is global: every layer dense
  after the op (converted or not) must get the same width, else ValueError.
  Not exact in general (exact=False): exact when the kept experts are identical and the gates of
  a token sum to 1 ('topk_softmax' renormalises; e.g. after an exact `upcycle`), and dropless.
  Moments: concatenated slices carry their experts' (wo: mu times s/k, nu times (s/k)^2, like
  a scaled copy); 'average' takes the mean of the experts' moments; 'fresh' starts at zero.
  """
  ids, counts, kk = _moe_layers(cfg, layers, k)
  fs = cfg.num_shared_experts * cfg.shared_d_ff
  width = _dense_width(cfg, ids, mode, kk)
  kept, missing = _kept_experts(counts, mode, kk, loads)
  new_cfg = _dense_config(cfg, counts, width)

  def rules(key):
    if missing:
      raise ValueError(f"to_dense: mode='concat_topk' needs loads={{layer: vector of experts}} for layers {missing}")
    scale = cfg.expert_output_scale / (1 if mode == "average" else kk)
    out = []
    for i in ids:
      out += _layer_rules(cfg, i, mode, kept.get(i), scale, width)
    return out + [(".*", R.copy())]

  note = ("exact only if the kept experts are identical and each token's gates sum to 1 (topk_softmax "
          "renormalises; e.g. after an exact upcycle) with dropless token-choice dispatch; otherwise the "
          "start of a distilled re-bake" if mode != "fresh" else "fresh dense MLPs: not function-preserving")
  return Plan(new_cfg, rules, exact=False, note=note,
              extra={"kept_experts": {str(i): es for i, es in kept.items()}, "kept": _kept_sources(cfg, kept, fs)})


def _moe_layers(cfg, layers, k: int | None) -> tuple[list[int], dict[int, int], int]:
  """(the layers to convert, {layer: its experts}, k): ValueError unless every layer is MoE and k
  (default top_k) is in 1..experts of each."""
  ids = resolve_layers(cfg, layers, "to_dense")
  if not ids:
    raise ValueError("to_dense: the model has no MoE layers")
  dense = [i for i in ids if not cfg.experts_in_layer(i)]
  if dense:
    raise ValueError(f"to_dense: layer(s) {dense} are already dense")
  counts = {i: cfg.experts_in_layer(i) for i in ids}
  kk = cfg.top_k if k is None else k
  bad = {i: e for i, e in counts.items() if not 1 <= kk <= e}
  if bad:
    raise ValueError(f"to_dense: k={kk} must be in 1..num_experts; layers {sorted(bad)} have experts {bad}")
  return ids, counts, kk


def _dense_width(cfg, ids: list[int], mode: str, kk: int) -> int:
  """The converted layers' d_ff (the experts' part, then the shared experts'); ValueError if the
  model's other dense layers have another (d_ff is one global size)."""
  f, fs = cfg.expert_d_ff, cfg.num_shared_experts * cfg.shared_d_ff
  width = (f if mode == "average" else kk * f) + fs
  others = [i for i in range(cfg.num_layers) if i not in ids and not cfg.experts_in_layer(i)]
  if others and cfg.d_ff != width:
    raise ValueError(f"to_dense: d_ff is one global size; mode={mode!r} makes layers {ids} dense with d_ff={width} "
                     f"but dense layers {others} have d_ff={cfg.d_ff} (widen them first: widen_mlp(d_ff={width}), "
                     "exact)")
  return width


def _kept_experts(counts: dict[int, int], mode: str, kk: int, loads) -> tuple[dict[int, list[int]], list[int]]:
  """({layer: the experts its dense MLP is made of, in order}, layers lacking loads): concat_topk
  keeps the kk of largest load, average all of them, fresh none."""
  kept, missing = {}, []
  if mode == "concat_topk":
    for i, e in counts.items():
      load = None if loads is None else loads.get(str(i), loads.get(i))
      if load is None:
        missing.append(i)
        continue
      if np.shape(load) != (e,) or not np.all(np.isfinite(np.asarray(load, np.float64))):
        raise ValueError(f"to_dense: loads for layer {i} must be a finite vector of {e} (got shape {np.shape(load)})")
      kept[i] = top_experts(load, kk)
  elif mode == "average":
    kept = {i: list(range(e)) for i, e in counts.items()}
  return kept, missing


def _dense_config(cfg, counts: dict[int, int], width: int):
  """The model config with the layers of `counts` dense at d_ff `width`."""
  remaining = {i: e for i, e in expert_counts(cfg).items() if i not in counts}
  fields = moe_fields(remaining, cfg.num_layers)
  if not remaining and isinstance(cfg.num_experts, tuple):
    fields["num_experts"] = max(cfg.num_experts)  # no MoE layer left: one count (unused)
  return cfg.replace(d_ff=width, **fields)


def _kept_sources(cfg, kept: dict[int, list[int]], fs: int) -> dict[str, list[str]]:
  """{dense leaf: the expert slices (then shared leaf, if any) it is made of}, for the plan's report."""
  sources = {}
  for i, es in kept.items():
    p = f"blocks/{i}/mlp/"
    for nm in mlp_names(cfg) + ("wo",):
      tgt, tab = (f"{nm}_FD", f"{nm}_EFD") if nm == "wo" else (f"{nm}_DF", f"{nm}_EDF")
      sources[p + tgt] = [f"{p}{tab}[{e}]" for e in es] + ([f"{p}shared/{tgt}"] if fs else [])
  return sources


def _layer_rules(cfg, i: int, mode: str, kept, scale: float, width: int):
  """Rules making layer i's dense wact_DF, wlin_DF, wo_FD: kept experts' slices (or their mean)
  then the shared experts', along F; `scale` multiplies the experts' part of wo."""
  p = f"blocks/{i}/mlp/"
  shared = cfg.num_shared_experts > 0
  drops = [(p + "router_DE", R.drop()), (p + "router_bias_E", R.drop()), (p + "selection_bias_E", R.drop())]
  if mode == "fresh":
    d = cfg.d_model
    rules = [(p + f"{nm}_DF", R.init("normal", std=fan_in_std(d))) for nm in mlp_names(cfg)]
    rules.append((p + "wo_FD", R.init("normal", std=fan_in_std(width))))
    return rules + drops + [(p + "(w(act|lin)_EDF|wo_EFD)", R.drop()), (p + "shared/.*", R.drop())]

  def build(kind, key, w_E, *shared_parts, axis, c):
    if mode == "average":  # a mean is linear: the moments' mean too (nu, fisher: times c^2)
      parts = [R.scaled(jnp.mean(w_E, axis=0), kind, c)]
    else:
      parts = [R.scaled(w_E[e], kind, c) for e in kept]
    return jnp.concatenate(parts + list(shared_parts), axis=axis)

  rules = []
  for nm in mlp_names(cfg):
    srcs = [p + f"{nm}_EDF"] + ([p + f"shared/{nm}_DF"] if shared else [])
    rules.append((p + f"{nm}_DF", R.compute(srcs, functools.partial(build, axis=1, c=None), f"to_dense:{mode}")))
  srcs = [p + "wo_EFD"] + ([p + "shared/wo_FD"] if shared else [])
  c = None if scale == 1 else scale
  rules.append((p + "wo_FD", R.compute(srcs, functools.partial(build, axis=0, c=c), f"to_dense:{mode}")))
  return rules + drops
