"""MoE growth ops: sparse upcycling (plain, fine-grained, Drop-Upcycling) and adding experts.

Each op maps (cfg, static args) to a `Plan` (see `moegrow.surgery.op`); the maths, exactness
conditions and moment scaling of each are in its docstring and in docs/growth.md.
"""
from __future__ import annotations

import functools
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moegrow.config import fan_in_std
from moegrow.params import balance, ramp
from moegrow.surgery import rules as R
from moegrow.surgery.op import (Layers, Plan, expert_counts, growth_op, mlp_names, moe_fields, resolve_counts,
                                resolve_layers)

# ---------------------------------------------------------------- upcycling

def _upcycle(cfg, *, op, layers, num_experts, top_k, gating, granularity, router_std, drop_ratio=0.0) -> Plan:
  _refuse_ramped(cfg, op)
  g = granularity
  ids = resolve_layers(cfg, layers, op)
  already = {i: cfg.experts_in_layer(i) for i in ids if cfg.experts_in_layer(i)}
  if already:
    raise ValueError(f"{op}: layer(s) {sorted(already)} are already MoE (experts {already}); use add_experts")
  if num_experts is None:
    if not isinstance(cfg.num_experts, int):
      raise ValueError(f"{op}: give num_experts (cfg.num_experts={cfg.num_experts!r} is per layer)")
    num_experts = cfg.num_experts
  counts = resolve_counts(num_experts, ids, op)
  existing = expert_counts(cfg)
  k = cfg.top_k if top_k is None else top_k
  gate = cfg.gating if gating is None else gating
  if g < 1 or cfg.d_ff % g:
    raise ValueError(f"{op}: granularity {g} must be >= 1 and divide d_ff={cfg.d_ff}")
  fe = cfg.d_ff // g
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"{op}: top_k={k!r} must be an integer >= 1 (each token goes to at least one expert)")
  for i, e in counts.items():
    if e < 1 or e % g or k > e or k < 1:
      raise ValueError(f"{op}: layer {i}: num_experts={e} must be a multiple of granularity {g} and >= top_k={k}")
  if k % g:
    raise ValueError(f"{op}: top_k={k} must be a multiple of granularity {g} (whole virtual groups)")
  if existing:
    clash = {"top_k": (k, cfg.top_k), "gating": (gate, cfg.gating), "expert_d_ff": (fe, cfg.expert_d_ff)}
    clash = {n: v for n, v in clash.items() if v[0] != v[1]}
    if clash:
      raise ValueError(f"{op}: the model already has MoE layers {sorted(existing)}; new layers would need "
                       + ", ".join(f"{n}={a} (model has {b})" for n, (a, b) in clash.items()))
  # Output scale m_l that preserves the function in layer l: E*G/k (softmax_topk, uniform router)
  # or G (topk_softmax, sigmoid_topk: gates renormalised over the chosen k). cfg.expert_output_scale is global: whatever it cannot carry goes into wo.
  need = {i: (e * g / k if gate == "softmax_topk" else float(g)) for i, e in counts.items()}
  scale = cfg.expert_output_scale if existing else need[ids[0]]
  std = cfg.router_init_std if router_std is None else router_std
  new_cfg = cfg.replace(top_k=k, gating=gate, expert_d_ff=fe, expert_output_scale=scale,
                        **moe_fields({**existing, **counts}, cfg.num_layers))
  exact = (gate != "softmax_topk" or std == 0.0) and drop_ratio == 0 and cfg.routing == "token_choice" \
      and cfg.dispatch == "dropless"
  note = ("topk_softmax, sigmoid_topk: exact for any router (gates sum to 1); softmax_topk: exact only with router_std=0 "
          "(uniform router), else approximate (the top-k mass is >= k/E: outputs biased up); capacity "
          "dispatch may drop tokens")
  return Plan(new_cfg, functools.partial(_upcycle_rules, cfg, counts, need, scale, g, fe, std, drop_ratio), exact,
              note)


def _upcycle_rules(cfg, counts, need, scale, g, fe, std, drop_ratio, key):
  d = cfg.d_model
  k_router, k_drop = jax.random.split(key)
  rules = []
  for i, e in counts.items():
    c = need[i] / scale
    p = f"blocks/{i}/mlp/"
    mask = None
    if drop_ratio > 0:  # Drop-Upcycling: per expert, re-initialise round(r*f) random hidden units
      n = int(round(drop_ratio * fe))
      keys = jax.random.split(jax.random.fold_in(k_drop, i), e)
      perm = jax.vmap(lambda kk: jax.random.permutation(kk, fe))(keys)[:, :n]
      mask = jnp.zeros((e, fe), bool).at[jnp.arange(e)[:, None], perm].set(True)

    def experts(kind, kk, w, out_proj, e=e, c=c, mask=mask):
      pieces = w.reshape(g, fe, d) if out_proj else w.reshape(d, g, fe).transpose(1, 0, 2)
      x = jnp.tile(pieces, (e // g, 1, 1))  # expert j: slice j mod G
      if mask is not None:
        mk = mask[:, :, None] if out_proj else mask[:, None, :]
        fresh = (jnp.zeros_like(x) if kind != "params" else
                 jnp.mean(w) + jnp.std(w) * jax.random.normal(kk, x.shape, x.dtype))
        x = jnp.where(mk, fresh, x)
      return R.scaled(x, kind, None if c == 1 else c) if out_proj else x

    def router(kind, kk, e=e, i=i):
      if kind != "params":
        return jnp.zeros((d, e), jnp.float32)
      r = std * jax.random.normal(jax.random.fold_in(k_router, i), (d, e // g), jnp.float32)
      return jnp.repeat(r, g, axis=1)  # virtual groups: G equal columns

    for nm in mlp_names(cfg):
      rules.append((p + f"{nm}_EDF", R.compute([p + f"{nm}_DF"], functools.partial(experts, out_proj=False),
                                               "upcycle_experts")))
    rules += [(p + "wo_EFD", R.compute([p + "wo_FD"], functools.partial(experts, out_proj=True), "upcycle_experts")),
              (p + "router_DE", R.compute([], router, "init:router")),
              (p + "router_bias_E", R.init("zeros")),
              (p + balance.LEAF, R.init("zeros")),  # loss-free balancing starts unbiased
              (p + "shared/wo_FD", R.init("zeros")),  # shared experts the config demands: output 0
              (p + "shared/w(act|lin)_DF", R.init("normal", std=fan_in_std(d)))]
  rules.append((".*", R.copy()))
  return rules


@growth_op
def upcycle(cfg, *, layers: Layers = "all", num_experts: int | Sequence[int] | Mapping[Any, int] | None = None,
            top_k: int | None = None, gating: Literal["topk_softmax", "softmax_topk", "sigmoid_topk"] | None = None,
            router_std: float | None = None) -> Plan:
  """Sparse upcycling: the dense MLP of each chosen layer becomes E identical experts.

  Router ~ N(0, router_std) (default cfg.router_init_std), bias 0. Exactness (dropless
  token-choice dispatch): 'topk_softmax' and 'sigmoid_topk' gates sum to 1 for any router, so the
  layer is exactly the dense MLP; 'softmax_topk' gates sum to the top-k softmax mass, which is k/E only for a
  uniform router: with router_std=0 and expert_output_scale E/k the layer is exact, with a
  random router only approximately (error O(router_std)). cfg.expert_output_scale is global:
  if MoE layers already exist (or layers get different E) the remaining per-layer factor is
  folded into the copied wo_EFD (its moments scale by c, c^2). If the config has shared experts,
  the new layers get shared experts with zero output projection (exact). `num_experts`: one count,
  one per layer (order of `layers`) or {layer: count}.
  """
  return _upcycle(cfg, op="upcycle", layers=layers, num_experts=num_experts, top_k=top_k, gating=gating,
                  granularity=1, router_std=router_std)


@growth_op
def granular_upcycle(cfg, *, granularity: int = 2, layers: Layers = "all",
                     num_experts: int | Sequence[int] | Mapping[Any, int] | None = None, top_k: int | None = None,
                     gating: Literal["topk_softmax", "softmax_topk", "sigmoid_topk"] | None = None, router_std: float | None = None,
                     ) -> Plan:
  """Fine-grained upcycling (He et al. 2024; Megatron-LM virtual groups), granularity G.

  The dense hidden f is cut into G slices of f/G; E = G*m experts, expert j holds slice j mod G,
  so each of the m "virtual groups" (experts gG..gG+G-1) is the whole dense MLP. Router columns
  are repeated G times per group; top_k must be a multiple of G, and because equal logits are
  ranked by index, top-k picks whole groups. Output scale: G for topk_softmax (exact for ANY
  router: each chosen group gets renormalised weight p_g/G per slice); E*G/k for softmax_topk,
  exact only for a uniform router (router_std=0; the chosen groups then hold mass k/E).
  expert_d_ff becomes d_ff/G. Exact also requires dropless token-choice dispatch.
  """
  return _upcycle(cfg, op="granular_upcycle", layers=layers, num_experts=num_experts, top_k=top_k, gating=gating,
                  granularity=granularity, router_std=router_std)


@growth_op
def drop_upcycle(cfg, *, ratio: float = 0.5, layers: Layers = "all",
                 num_experts: int | Sequence[int] | Mapping[Any, int] | None = None, top_k: int | None = None,
                 gating: Literal["topk_softmax", "softmax_topk", "sigmoid_topk"] | None = None, router_std: float | None = None,
                 ) -> Plan:
  """Drop-Upcycling (Nakamura et al. 2025): upcycle, then in every expert re-initialise
  round(ratio*f) hidden units chosen at random per expert (columns F of wact_EDF/wlin_EDF and rows F
  of wo_EFD, the same units in all three) from N(mean, std) of the original dense matrix.
  The other weights are bit-identical copies. Moments of re-initialised units are zero. Not exact."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"drop_upcycle: ratio={ratio} must be in [0, 1]")
  return _upcycle(cfg, op="drop_upcycle", layers=layers, num_experts=num_experts, top_k=top_k, gating=gating,
                  granularity=1, router_std=router_std, drop_ratio=ratio)


# ---------------------------------------------------------------- more experts

@growth_op
def add_experts(cfg, *, num_experts: int | Sequence[int] | Mapping[Any, int],
                layers: Layers | Literal["moe"] = "moe", source: Literal["round_robin", "most_loaded"] = "round_robin",
                loads: Mapping[Any, Any] | None = None, mode: Literal["exact", "copy_noise", "split"] = "exact",
                noise_std: float | None = None, new_bias: float = -1e4,
                router_init: Literal["copy", "hidden"] = "copy", router_domain: str = "",
                centroids: Mapping[Any, Any] | None = None, ramp_steps: int = 0) -> Plan:
  """Grow E -> E' experts in MoE layers (default: all of them); E' < E is an error.

  New expert j copies old expert src[j]: 'round_robin' src = j mod E; 'most_loaded' takes the
  old experts by decreasing `loads[layer]` (a length-E vector per layer, keys int or str).
  Modes:
    exact:      router columns copy the source; new router_bias entries = new_bias (-1e4): new
                logits never reach the top-k (k <= E) and their softmax mass underflows to 0, so
                logits are preserved exactly (the aux load-balancing loss changes with E).
                Their gradients are ~0 too: the trainer should anneal router_bias towards 0.
                New bias entries get zero moments.
    copy_noise: router column and bias copy the source; the new expert's weights and router column
                get gaussian noise of std noise_std (default 0.01) times the std of the copied
                matrix (per expert) / column. Old experts are bit-identical. Not exact.
    split:      copy, then every source expert s with c_s copies in total (itself included) has its
                bias, and its copies', lowered by log(c_s): the full router softmax over distinct
                experts is unchanged (the copies share their source's probability mass), so the
                dense mixture sum_e p_e y_e is preserved; top-k outputs are not (not exact).
  noise_std (default 0 except copy_noise) also perturbs new experts in exact/split mode.
  router_init='hidden' (mode copy_noise only): the new experts are routed from the new domain's
    hidden states (mergekit-moe's 'hidden' gate mode, for growth): with `centroids[layer]` =
    [old data's mean MLP input, the new domain's] ([2, D], measured by the caller on the old
    model; the trainer does it at a stage boundary for `router_domain`), each new column is
    (c_new - c_old) / |c_new - c_old| times the mean norm of the layer's old columns (plus the
    copy noise), and its bias makes its logit at the midpoint m = (c_old + c_new) / 2 equal the
    old experts' mean logit there: b = mean_e (m W_e + b_e) - m col. Tokens nearer the new
    domain's centroid score higher on the new experts. Their router moments start at zero.
  ramp_steps=N > 0 (ramped growth, MSG; modes exact / copy_noise): the new experts are the
    copy_noise ones (noise_std default 0.01), with router bias 0 (router_init='hidden': its
    bias), behind a mask m = 0 -> 1 over N steps that adds max(log m, -1e4) to their router bias
    (their gate weight times m): exact at m = 0, the plain grown model at m = 1 (moegrow.params.ramp).
  Moments: copies carry their source's moments. Loss-free balancing's selection bias: a copy's is
  its source's; in exact and ramp modes a new expert's is min(b) - 1 (never chosen until the
  balancing updates raise it).
  """
  _refuse_ramped(cfg, "add_experts")
  _check_ramp_args(ramp_steps, mode, new_bias)
  if ramp_steps and cfg.gating == "sigmoid_topk":
    raise ValueError("add_experts: ramp_steps scales a new expert's softmax weight by m through its logit; "
                     "gating='sigmoid_topk' has no softmax to scale (use mode='exact')")
  counts = _grown_counts(cfg, layers, num_experts)
  sigma = (0.01 if mode == "copy_noise" or ramp_steps else 0.0) if noise_std is None else noise_std
  if router_init == "hidden" and mode != "copy_noise":
    raise ValueError("add_experts: router_init='hidden' routes tokens to the new experts: it needs mode='copy_noise' "
                     f"(mode={mode!r} keeps the new experts unrouted or shares their source's mass)")
  new_cfg, name = _grown_expert_config(cfg, counts, ramp_steps)
  sources, missing = _copy_sources(cfg, counts, source, loads)
  hidden = _hidden_centroids(cfg, counts, centroids) if router_init == "hidden" else {}

  def rules(key):
    if missing:
      raise ValueError(f"add_experts: source='most_loaded' needs loads={{layer: vector of experts}} for layers "
                       f"{missing}")
    absent = [i for i, c in hidden.items() if c is None]
    if absent:
      raise ValueError(f"add_experts: router_init='hidden' needs centroids={{layer: [old, new] mean MLP inputs}} for "
                       f"layers {absent} (router_domain={router_domain!r})")
    out = [(f"ramp/{name}", R.init("zeros"))] if name else []
    for i, src in sources.items():
      out.extend(_add_expert_rules(cfg, i, src, "ramp" if name else mode, sigma, new_bias, hidden.get(i)))
    return out + [(".*", R.copy())]

  exact = (mode == "exact" or name is not None) and cfg.dispatch == "dropless" and cfg.routing == "token_choice"
  note = ("exact mode preserves logits (dropless dispatch: capacity shrinks with E); the aux loss changes with E"
          + (f"; ramp {name!r}: the new experts' gates are times m = 0 -> 1 over {ramp_steps} steps" if name else ""))
  return Plan(new_cfg, rules, exact=exact, note=note,
              extra={"sources": {str(i): s.tolist() for i, s in sources.items()}})


def _check_ramp_args(ramp_steps: int, mode: str, new_bias: float) -> None:
  """ramp_steps >= 0, and with a ramp: a mode the ramp can undo, the default new_bias."""
  if ramp_steps < 0:
    raise ValueError(f"add_experts: ramp_steps={ramp_steps} must be >= 0")
  if ramp_steps and mode == "split":
    raise ValueError("add_experts: mode='split' lowers the old experts' biases, which a ramp on the new experts "
                     "cannot undo; use mode='exact' or 'copy_noise' with ramp_steps")
  if ramp_steps and new_bias != -1e4:
    raise ValueError(f"add_experts: new_bias={new_bias} has no effect with ramp_steps (the new experts' bias starts "
                     "at 0 and the ramp's mask supplies the -1e4)")


def _grown_counts(cfg, layers, num_experts) -> dict[int, int]:
  """{MoE layer: its new expert count}; ValueError for dense layers, no MoE layer, or a shrink."""
  ids = resolve_layers(cfg, layers, "add_experts")
  dense = [i for i in ids if not cfg.experts_in_layer(i)]
  if dense:
    raise ValueError(f"add_experts: layer(s) {dense} are dense (no experts); upcycle them first")
  if not ids:
    raise ValueError("add_experts: the model has no MoE layers")
  counts = resolve_counts(num_experts, ids, "add_experts")
  for i, e2 in counts.items():
    if e2 < cfg.experts_in_layer(i):
      raise ValueError(f"add_experts: layer {i} has {cfg.experts_in_layer(i)} experts; cannot shrink to {e2}")
  return counts


def _grown_expert_config(cfg, counts: dict[int, int], ramp_steps: int) -> tuple[Any, str | None]:
  """(the config with the new expert counts, the name of the ramp on the new experts' router bias,
  or None without ramp_steps or new experts)."""
  new_cfg = cfg.replace(**moe_fields({**expert_counts(cfg), **counts}, cfg.num_layers))
  if not ramp_steps:
    return new_cfg, None
  targets = [ramp.logbias(f"blocks/{i}/mlp/router_bias_E", cfg.experts_in_layer(i), e2)
             for i, e2 in counts.items() if e2 > cfg.experts_in_layer(i)]
  if not targets:
    return new_cfg, None
  name = f"add_experts{len(cfg.ramps)}"
  return new_cfg.replace(ramps=cfg.ramps + (ramp.entry(name, ramp_steps, targets),)), name


def _copy_sources(cfg, counts: dict[int, int], source: str, loads) -> tuple[dict[int, np.ndarray], list[int]]:
  """({layer: the old expert each new one copies}, layers lacking loads). Fixed by the config for
  round_robin, by measured loads (a probe's output, passed in) for most_loaded; the new config
  does not depend on them."""
  sources, missing = {}, []
  for i, e2 in counts.items():
    e = cfg.experts_in_layer(i)
    if source == "most_loaded":
      load = None if loads is None else loads.get(str(i), loads.get(i))
      if load is None:
        missing.append(i)
        continue
      if np.shape(load) != (e,):
        raise ValueError(f"add_experts: loads for layer {i} must be a vector of {e} (got shape {np.shape(load)})")
      order = np.argsort(-np.asarray(load, np.float64), kind="stable")
    else:
      order = np.arange(e)
    sources[i] = np.asarray([order[j % e] for j in range(e2 - e)], np.int32)
  return sources, missing


def _hidden_centroids(cfg, counts: dict[int, int], centroids) -> dict[int, Any]:
  """{layer: [old, new] mean MLP inputs, or None if not given} for router_init='hidden'."""
  hidden = {}
  for i in counts:
    c = None if centroids is None else centroids.get(str(i), centroids.get(i))
    if c is not None and np.shape(c) != (2, cfg.d_model):
      raise ValueError(f"add_experts: centroids for layer {i} must be [old, new] of shape (2, {cfg.d_model}) "
                       f"(got {np.shape(c)})")
    hidden[i] = c
  return hidden


def _refuse_ramped(cfg, op: str) -> None:
  """Growth ops run on models without ramps: `surgery.apply` folds them first (fold_ramps)."""
  if cfg.ramps:
    raise ValueError(f"{op}: the model carries ramps {[r[0] for r in cfg.ramps]}; fold them first with "
                     "{'op': 'fold_ramps'} (moegrow.surgery.apply does it before any other op)")


def _hidden_column(w_DE, cents):
  """The new experts' router column: (c_new - c_old) normalised, times the old columns' mean norm."""
  c = jnp.asarray(cents, jnp.float32)
  d_D = c[1] - c[0]
  w = w_DE.astype(jnp.float32)
  return d_D / jnp.maximum(jnp.linalg.norm(d_D), 1e-8) * jnp.mean(jnp.linalg.norm(w, axis=0))


def _add_expert_rules(cfg, i: int, src, mode: str, sigma: float, new_bias: float, hidden=None):
  copies = 1 + np.bincount(src, minlength=cfg.experts_in_layer(i))
  n = len(src)

  def hidden_router(kind, kk, w_DE):
    if kind != "params":  # a new column: no history, no importance
      return jnp.concatenate([w_DE, jnp.zeros((w_DE.shape[0], n), w_DE.dtype)], axis=1)
    col_D = _hidden_column(w_DE, hidden)
    new = jnp.repeat(col_D[:, None], n, axis=1)
    if sigma > 0:  # the copy noise also separates several new experts of one domain
      noise = jax.random.normal(jax.random.fold_in(kk, 1), new.shape, jnp.float32)
      new = new + sigma * jnp.std(col_D) * noise
    return jnp.concatenate([w_DE, new.astype(w_DE.dtype)], axis=1)

  def hidden_bias(kind, kk, b_E, w_DE):
    if kind != "params":
      return jnp.concatenate([b_E, jnp.zeros((n,), b_E.dtype)])
    c = jnp.asarray(hidden, jnp.float32)
    m_D = (c[0] + c[1]) / 2
    old = jnp.mean(m_D @ w_DE.astype(jnp.float32) + b_E.astype(jnp.float32))
    b = old - m_D @ _hidden_column(w_DE, hidden)  # the new logit at the midpoint = the old experts' mean
    return jnp.concatenate([b_E, jnp.full((n,), b, b_E.dtype)])

  def grow(kind, kk, w, axis):
    new = jnp.take(w, src, axis=axis)
    if kind == "fisher":  # a new expert is new capacity: no importance yet, whatever it copies
      return jnp.concatenate([w, jnp.zeros_like(new)], axis=axis)
    if kind == "params" and sigma > 0:
      red = tuple(a for a in range(w.ndim) if a != axis)
      noise = jax.random.normal(jax.random.fold_in(kk, 1), new.shape, new.dtype)
      new = new + sigma * jnp.std(new, axis=red, keepdims=True) * noise
    return jnp.concatenate([w, new], axis=axis)

  def bias(kind, kk, b):
    if mode == "ramp":  # bias 0 (zero moments): the ramp's log m switches the new experts on
      return jnp.concatenate([b, jnp.zeros((len(src),), b.dtype)])
    if kind == "fisher":
      return jnp.concatenate([b, jnp.zeros((len(src),), b.dtype)])
    if mode == "exact":
      fill = new_bias if kind == "params" else 0.0
      return jnp.concatenate([b, jnp.full((len(src),), fill, b.dtype)])
    if mode == "split" and kind == "params":
      b = b - jnp.log(jnp.asarray(copies, b.dtype))  # copies share their source's softmax mass
    return jnp.concatenate([b, b[src]])

  def selection_bias(kind, kk, b):
    """Loss-free balancing's bias (moegrow.params.balance): a copy's is its source's; an expert
    added unrouted (exact, ramp) gets min(b) - 1, below every old expert's score + bias."""
    if kind != "params":  # frozen: no moments, no importance
      return jnp.concatenate([b, jnp.zeros((n,), b.dtype)])
    if mode in ("exact", "ramp"):
      return jnp.concatenate([b, jnp.full((n,), jnp.min(b) - 1, b.dtype)])
    return jnp.concatenate([b, b[src]])

  p = f"blocks/{i}/mlp/"
  rules = [(p + f"{nm}_EDF", R.compute([p + f"{nm}_EDF"], functools.partial(grow, axis=0), "add_experts"))
           for nm in mlp_names(cfg)]
  rules.append((p + "wo_EFD", R.compute([p + "wo_EFD"], functools.partial(grow, axis=0), "add_experts")))
  rules.append((p + balance.LEAF, R.compute([p + balance.LEAF], selection_bias, "add_experts:selection_bias")))
  if hidden is not None:
    return rules + [(p + "router_DE", R.compute([p + "router_DE"], hidden_router, "add_experts:hidden_router")),
                    (p + "router_bias_E", R.compute([p + "router_bias_E", p + "router_DE"], hidden_bias,
                                                    "add_experts:hidden_bias"))]
  return rules + [(p + "router_DE", R.compute([p + "router_DE"], functools.partial(grow, axis=1), "add_experts")),
                  (p + "router_bias_E", R.compute([p + "router_bias_E"], bias, f"add_experts:{mode}_bias"))]
