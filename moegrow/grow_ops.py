"""Growth-op machinery (argument checking, state handling, reports) and the MoE growth ops.

See `moegrow.grow` for the public API, the depth/width ops and the driver `apply_ops`.
Every op is `op(state, cfg, key, **args) -> (new_state, new_cfg, report)` on plain dicts:
state = {'params': P, 'mu': P-shaped or None, 'nu': P-shaped or None[, 'count': kept]}.
"""
from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from moegrow import tree as T
from moegrow.config import ModelConfig
from moegrow.transformer import abstract_params

STATE_KEYS = ("params", "mu", "nu", "count")
MOMENTS = ("mu", "nu")


# ---------------------------------------------------------------- argument checking

def _conforms(v, tp) -> bool:
  if tp is Any:
    return True
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (Union, types.UnionType):
    return any(_conforms(v, a) for a in args)
  if origin is Literal:
    return any(type(v) is type(a) and v == a for a in args)
  if tp is type(None):
    return v is None
  if tp is bool:
    return isinstance(v, (bool, np.bool_))
  if tp is int:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
  if tp is float:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
  if tp is str:
    return isinstance(v, str)
  if origin in (collections.abc.Sequence, list, tuple):
    return isinstance(v, (list, tuple)) and all(_conforms(x, args[0] if args else Any) for x in v)
  if origin in (collections.abc.Mapping, dict):
    kt, vt = args if args else (Any, Any)
    return isinstance(v, Mapping) and all(_conforms(a, kt) and _conforms(b, vt) for a, b in v.items())
  return isinstance(v, tp)


def growth_op(fn):
  """Checks keyword arguments (names and types from the annotations) and the state keys."""
  sig = inspect.signature(fn)
  hints = typing.get_type_hints(fn)
  names = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]

  @functools.wraps(fn)
  def wrapper(state, cfg, key=None, **args):
    unknown = sorted(set(args) - set(names))
    if unknown:
      raise ValueError(f"{fn.__name__}: unknown argument(s) {unknown}; valid: {names}")
    for n, v in args.items():
      if not _conforms(v, hints[n]):
        raise ValueError(f"{fn.__name__}: argument {n}={v!r} must be {fn.__annotations__[n]}")
    if not isinstance(cfg, ModelConfig):
      raise ValueError(f"{fn.__name__}: cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(state, Mapping) or "params" not in state:
      raise ValueError(f"{fn.__name__}: state must be a dict with 'params' (and optional 'mu', 'nu')")
    extra = sorted(set(state) - set(STATE_KEYS))
    if extra:
      raise ValueError(f"{fn.__name__}: unknown state keys {extra}; allowed {list(STATE_KEYS)}")
    key = jax.random.PRNGKey(0) if key is None else key
    return fn(state, cfg, key, **args)

  wrapper.arg_names = tuple(names)
  return wrapper


def jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.integer, np.floating, np.bool_)):
    return x.item()
  return x


# ---------------------------------------------------------------- state through rules

def run_rules(state, old_cfg: ModelConfig, new_cfg: ModelConfig, rules, key, *, op: str, args: dict,
              opt_state: str, exact: bool, note: str = ""):
  """Params and (if present) Adam moments through one rule set -> (state, new_cfg, report).

  carry: each action decides (copies carry, scaled copies scale mu by c and nu by c^2, new
  slices are zeros); reset: every target leaf that is not an unmodified copy gets zero moments.
  """
  target = abstract_params(new_cfg)
  params, plan = T.apply_rules(state["params"], target, rules, key, "params")
  new = dict(state)
  new["params"] = params
  for kind in MOMENTS:
    m = state.get(kind)
    if m is None:
      continue
    dts = {jnp.dtype(x.dtype) for x in T.flatten(m).values()}
    dt = dts.pop() if len(dts) == 1 else None
    want = {p: jax.ShapeDtypeStruct(s.shape, dt or s.dtype) for p, s in T.flatten(target).items()}
    out, _ = T.apply_rules(m, want, rules, key, kind, check_dtype=dt is not None)
    if opt_state == "reset":
      flat = T.flatten(out)
      out = T.unflatten({p: x if plan[p][0].preserves else jnp.zeros_like(x) for p, x in flat.items()})
    new[kind] = out
  report = {"op": op, "args": jsonable(args), "opt_state": opt_state, "exact": bool(exact),
            "note": note, "old_config": old_cfg.to_dict(), "new_config": new_cfg.to_dict(),
            "map": T.describe_plan(plan)}
  return new, new_cfg, report


# ---------------------------------------------------------------- config helpers

def resolve_layers(cfg: ModelConfig, spec, op: str, num_layers: int | None = None) -> list[int]:
  n = cfg.num_layers if num_layers is None else num_layers
  if spec == "all":
    return list(range(n))
  if spec == "every_other":
    return list(range(1, n, 2))
  if spec == "moe":
    return list(cfg.moe_layer_ids)
  ids = [int(spec)] if isinstance(spec, (int, np.integer)) else [int(i) for i in spec]
  bad = [i for i in ids if not 0 <= i < n]
  if bad:
    raise ValueError(f"{op}: layer(s) {bad} do not exist (the model has {n} layers, 0..{n - 1})")
  if len(set(ids)) != len(ids):
    raise ValueError(f"{op}: layers {ids} repeat an index")
  return sorted(ids)


def resolve_counts(spec, layers: list[int], op: str, what: str = "num_experts") -> dict[int, int]:
  """int (all layers), sequence (one per layer, in the order of `layers`) or {layer: count}."""
  if isinstance(spec, (int, np.integer)):
    return {i: int(spec) for i in layers}
  if isinstance(spec, Mapping):
    counts = {int(k): int(v) for k, v in spec.items()}
    if set(counts) != set(layers):
      raise ValueError(f"{op}: {what} given for layers {sorted(counts)} but the op acts on layers {layers}")
    return counts
  if len(spec) != len(layers):
    raise ValueError(f"{op}: {what} has {len(spec)} entries for {len(layers)} layers {layers}")
  return {i: int(e) for i, e in zip(layers, spec)}


def moe_fields(counts: Mapping[int, int], num_layers: int) -> dict[str, Any]:
  """Config fields for {layer: experts} (0 or absent: dense)."""
  ids = sorted(i for i, e in counts.items() if e > 0)
  if not ids:
    return {"moe_layers": "none"}
  es = [int(counts[i]) for i in ids]
  pattern = ("all" if ids == list(range(num_layers)) else
             "every_other" if ids == list(range(1, num_layers, 2)) else tuple(ids))
  return {"moe_layers": pattern, "num_experts": es[0] if len(set(es)) == 1 else tuple(es)}


def expert_counts(cfg: ModelConfig) -> dict[int, int]:
  return {i: cfg.experts_in_layer(i) for i in cfg.moe_layer_ids}


def fan_in(d: int) -> float:
  return 1.0 / math.sqrt(d)


def mlp_names(cfg: ModelConfig) -> tuple[str, ...]:
  return ("wi", "wg") if cfg.mlp_act == "swiglu" else ("wi",)


Layers = Union[Literal["all", "every_other"], int, Sequence[int]]
OptState = Literal["carry", "reset"]


# ---------------------------------------------------------------- upcycling

def _upcycle(state, cfg, key, *, op, args, layers, num_experts, top_k, gating, granularity, router_std,
             opt_state, drop_ratio=0.0):
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
  # or G (topk_softmax). cfg.expert_output_scale is global: whatever it cannot carry goes into wo.
  need = {i: (e * g / k if gate == "softmax_topk" else float(g)) for i, e in counts.items()}
  scale = cfg.expert_output_scale if existing else need[ids[0]]
  std = cfg.router_init_std if router_std is None else router_std
  new_cfg = cfg.replace(top_k=k, gating=gate, expert_d_ff=fe, expert_output_scale=scale,
                        **moe_fields({**existing, **counts}, cfg.num_layers))
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
      return T._scaled(x, kind, None if c == 1 else c) if out_proj else x

    def router(kind, kk, e=e, i=i):
      if kind != "params":
        return jnp.zeros((d, e), jnp.float32)
      r = std * jax.random.normal(jax.random.fold_in(k_router, i), (d, e // g), jnp.float32)
      return jnp.repeat(r, g, axis=1)  # virtual groups: G equal columns

    for nm in mlp_names(cfg):
      rules.append((p + f"{nm}_EDF", T.compute([p + f"{nm}_DF"], functools.partial(experts, out_proj=False),
                                               "upcycle_experts")))
    rules += [(p + "wo_EFD", T.compute([p + "wo_FD"], functools.partial(experts, out_proj=True), "upcycle_experts")),
              (p + "router_DE", T.compute([], router, "init:router")),
              (p + "router_bias_E", T.init("zeros")),
              (p + "shared/wo_FD", T.init("zeros")),  # shared experts the config demands: output 0
              (p + "shared/w[ig]_DF", T.init("normal", std=fan_in(d)))]
  rules.append((".*", T.copy()))
  exact = (gate == "topk_softmax" or std == 0.0) and drop_ratio == 0 and cfg.routing == "token_choice" \
      and cfg.dispatch == "dropless"
  note = ("topk_softmax: exact for any router; softmax_topk: exact only with router_std=0 "
          "(uniform router), else exact in expectation; capacity dispatch may drop tokens")
  return run_rules(state, cfg, new_cfg, rules, key, op=op, args=args, opt_state=opt_state, exact=exact, note=note)


@growth_op
def upcycle(state, cfg, key, *, layers: Layers = "all", num_experts: int | Sequence[int] | Mapping[Any, int] | None = None,
            top_k: int | None = None, gating: Literal["topk_softmax", "softmax_topk"] | None = None,
            router_std: float | None = None, opt_state: OptState = "carry"):
  """Sparse upcycling: the dense MLP of each chosen layer becomes E identical experts.

  Router ~ N(0, router_std) (default cfg.router_init_std), bias 0. Exactness (dropless
  token-choice dispatch): 'topk_softmax' gates sum to 1 for any router, so the layer is exactly
  the dense MLP; 'softmax_topk' gates sum to the top-k softmax mass, which is k/E only for a
  uniform router: with router_std=0 and expert_output_scale E/k the layer is exact, with a
  random router only approximately (error O(router_std)). cfg.expert_output_scale is global:
  if MoE layers already exist (or layers get different E) the remaining per-layer factor is
  folded into the copied wo_EFD (its moments scale by c, c^2). If the config has shared experts,
  the new layers get shared experts with zero output projection (exact). `num_experts`: one count,
  one per layer (order of `layers`) or {layer: count}.
  """
  args = dict(layers=layers, num_experts=num_experts, top_k=top_k, gating=gating, router_std=router_std)
  return _upcycle(state, cfg, key, op="upcycle", args=args, granularity=1, opt_state=opt_state, **args)


@growth_op
def granular_upcycle(state, cfg, key, *, granularity: int = 2, layers: Layers = "all",
                     num_experts: int | Sequence[int] | Mapping[Any, int] | None = None, top_k: int | None = None,
                     gating: Literal["topk_softmax", "softmax_topk"] | None = None, router_std: float | None = None,
                     opt_state: OptState = "carry"):
  """Fine-grained upcycling (He et al. 2024; Megatron-LM virtual groups), granularity G.

  The dense hidden f is cut into G slices of f/G; E = G*m experts, expert j holds slice j mod G,
  so each of the m "virtual groups" (experts gG..gG+G-1) is the whole dense MLP. Router columns
  are repeated G times per group; top_k must be a multiple of G, and because equal logits are
  ranked by index, top-k picks whole groups. Output scale: G for topk_softmax (exact for ANY
  router: each chosen group gets renormalised weight p_g/G per slice); E*G/k for softmax_topk,
  exact only for a uniform router (router_std=0; the chosen groups then hold mass k/E).
  expert_d_ff becomes d_ff/G. Exact also requires dropless token-choice dispatch.
  """
  args = dict(layers=layers, num_experts=num_experts, top_k=top_k, gating=gating, router_std=router_std)
  return _upcycle(state, cfg, key, op="granular_upcycle", args={**args, "granularity": granularity},
                  granularity=granularity, opt_state=opt_state, **args)


@growth_op
def drop_upcycle(state, cfg, key, *, ratio: float = 0.5, layers: Layers = "all",
                 num_experts: int | Sequence[int] | Mapping[Any, int] | None = None, top_k: int | None = None,
                 gating: Literal["topk_softmax", "softmax_topk"] | None = None, router_std: float | None = None,
                 opt_state: OptState = "carry"):
  """Drop-Upcycling (Nakamura et al. 2025): upcycle, then in every expert re-initialise
  round(ratio*f) hidden units chosen at random per expert (columns F of wi_EDF/wg_EDF and rows F
  of wo_EFD, the same units in all three) from N(mean, std) of the original dense matrix.
  The other weights are bit-identical copies. Moments of re-initialised units are zero. Not exact."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"drop_upcycle: ratio={ratio} must be in [0, 1]")
  args = dict(layers=layers, num_experts=num_experts, top_k=top_k, gating=gating, router_std=router_std)
  return _upcycle(state, cfg, key, op="drop_upcycle", args={**args, "ratio": ratio}, granularity=1,
                  opt_state=opt_state, drop_ratio=ratio, **args)


# ---------------------------------------------------------------- more experts

@growth_op
def add_experts(state, cfg, key, *, num_experts: int | Sequence[int] | Mapping[Any, int],
                layers: Layers | Literal["moe"] = "moe", source: Literal["round_robin", "most_loaded"] = "round_robin",
                loads: Mapping[Any, Any] | None = None, mode: Literal["exact", "copy_noise", "split"] = "exact",
                noise_std: float | None = None, new_bias: float = -1e4, opt_state: OptState = "carry"):
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
  Moments: copies carry their source's moments.
  """
  op = "add_experts"
  ids = resolve_layers(cfg, layers, op)
  dense = [i for i in ids if not cfg.experts_in_layer(i)]
  if dense:
    raise ValueError(f"{op}: layer(s) {dense} are dense (no experts); upcycle them first")
  if not ids:
    raise ValueError(f"{op}: the model has no MoE layers")
  counts = resolve_counts(num_experts, ids, op)
  for i, e2 in counts.items():
    if e2 < cfg.experts_in_layer(i):
      raise ValueError(f"{op}: layer {i} has {cfg.experts_in_layer(i)} experts; cannot shrink to {e2}")
  sigma = (0.01 if mode == "copy_noise" else 0.0) if noise_std is None else noise_std
  new_cfg = cfg.replace(**moe_fields({**expert_counts(cfg), **counts}, cfg.num_layers))
  sources = {}
  rules = []
  for i, e2 in counts.items():
    e = cfg.experts_in_layer(i)
    if source == "most_loaded":
      if loads is None:
        raise ValueError(f"{op}: source='most_loaded' needs loads={{layer: vector of {e}}}")
      load = loads.get(str(i), loads.get(i))
      if load is None or np.shape(load) != (e,):
        raise ValueError(f"{op}: loads for layer {i} must be a vector of {e} (got {None if load is None else np.shape(load)})")
      order = np.argsort(-np.asarray(load, np.float64), kind="stable")
    else:
      order = np.arange(e)
    src = np.asarray([order[j % e] for j in range(e2 - e)], np.int32)
    sources[str(i)] = src.tolist()
    copies = 1 + np.bincount(src, minlength=e)
    ki = jax.random.fold_in(key, i)

    def grow(kind, kk, w, axis, src=src, ki=ki):
      new = jnp.take(w, src, axis=axis)
      if kind == "params" and sigma > 0:
        red = tuple(a for a in range(w.ndim) if a != axis)
        noise = jax.random.normal(jax.random.fold_in(kk, 1), new.shape, new.dtype)
        new = new + sigma * jnp.std(new, axis=red, keepdims=True) * noise
      return jnp.concatenate([w, new], axis=axis)

    def bias(kind, kk, b, src=src, copies=copies):
      if mode == "exact":
        fill = new_bias if kind == "params" else 0.0
        return jnp.concatenate([b, jnp.full((len(src),), fill, b.dtype)])
      if mode == "split" and kind == "params":
        b = b - jnp.log(jnp.asarray(copies, b.dtype))
      return jnp.concatenate([b, b[src]])

    p = f"blocks/{i}/mlp/"
    rules += [(p + f"{nm}_EDF", T.compute([p + f"{nm}_EDF"], functools.partial(grow, axis=0), "add_experts"))
              for nm in mlp_names(cfg)]
    rules += [(p + "wo_EFD", T.compute([p + "wo_EFD"], functools.partial(grow, axis=0), "add_experts")),
              (p + "router_DE", T.compute([p + "router_DE"], functools.partial(grow, axis=1), "add_experts")),
              (p + "router_bias_E", T.compute([p + "router_bias_E"], bias, f"add_experts:{mode}_bias"))]
  rules.append((".*", T.copy()))
  args = dict(num_experts=num_experts, layers=layers, source=source, loads=loads, mode=mode,
              noise_std=noise_std, new_bias=new_bias)
  new, new_cfg, report = run_rules(state, cfg, new_cfg, rules, key, op=op, args=args, opt_state=opt_state,
                                   exact=mode == "exact" and cfg.dispatch == "dropless",
                                   note="exact mode preserves logits (dropless dispatch: capacity shrinks "
                                        "with E); the aux loss changes with E")
  report["sources"] = sources
  return new, new_cfg, report
