"""Depth and width growth ops: insert blocks, stack (G_stack), widen the MLP (Net2WiderNet),
add attention heads, widen the residual stream (MSG). Each maps (cfg, static args) to a `Plan`
(see `moegrow.surgery.op`); maths and exactness in each docstring and in docs/growth.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from moegrow.config import ModelConfig, fan_in_std
from moegrow.params import ramp
from moegrow.surgery import rules as R
from moegrow.surgery.moe_ops import _refuse_ramped
from moegrow.surgery.op import Plan, expert_counts, growth_op, mlp_names, moe_fields


def _ramped(cfg: ModelConfig, new_cfg: ModelConfig, op: str, steps: int, targets: list) -> tuple:
  """(new_cfg with a ramp of `steps` over `targets` appended, its name) or (new_cfg, None) when
  the op adds no ramp (steps 0 or nothing new)."""
  if steps < 0:
    raise ValueError(f"{op}: ramp_steps={steps} must be >= 0")
  if not steps or not targets:
    return new_cfg, None
  name = f"{op}{len(cfg.ramps)}"
  return new_cfg.replace(ramps=cfg.ramps + (ramp.entry(name, steps, targets),)), name


# ---------------------------------------------------------------- depth

def _new_block_rules(cfg: ModelConfig, j: int, ramped: bool = False):
  """A fresh block whose residual contributions are 0: output projections zero, rest at init.
  `ramped`: output projections at init scale too (the ramp's mask makes the contributions 0)."""
  p, d = f"blocks/{j}/", cfg.d_model
  out = lambda *fan: R.init("normal", std=fan_in_std(*(max(f, 1) for f in fan))) if ramped else R.init("zeros")
  return [(p + "(attn_norm|mlp_norm)/scale_D", R.init("ones")),
          (p + "attn/w[qkv]_D[HU]A", R.init("normal", std=fan_in_std(d))),
          (p + "attn/wo_HAD", out(cfg.num_heads, cfg.head_dim)),
          (p + "attn/b[qkv]_[HU]A", R.init("zeros")),
          (p + "attn/[qk]norm_[HU]?A", R.init("ones")),
          (p + "mlp/(shared/)?w(act|lin)_DF", R.init("normal", std=fan_in_std(d))),
          (p + "mlp/shared/wo_FD", out(cfg.num_shared_experts * cfg.shared_d_ff)),
          (p + "mlp/wo_FD", out(cfg.d_ff)),
          (p + "mlp/w(act|lin)_EDF", R.init("normal", std=fan_in_std(d))),
          (p + "mlp/wo_EFD", out(cfg.expert_d_ff)),
          (p + "mlp/router_DE", R.init("normal", std=cfg.router_init_std)),
          (p + "mlp/router_bias_E", R.init("zeros")),
          (p + "mlp/selection_bias_E", R.init("zeros")),  # loss-free balancing starts unbiased
          (p + "mlp/shared_gate_D", R.init("normal", std=fan_in_std(d)))]


def _block_targets(cfg: ModelConfig, j: int, num_experts: int) -> list[tuple]:
  """A new block's output projections, whole, as "scale" ramp targets."""
  p = f"blocks/{j}/"
  out = [ramp.scale(p + "attn/wo_HAD", 0, 0, cfg.num_heads)]
  if not num_experts:
    return out + [ramp.scale(p + "mlp/wo_FD", 0, 0, cfg.d_ff)]
  out.append(ramp.scale(p + "mlp/wo_EFD", 0, 0, num_experts))
  if cfg.num_shared_experts:
    out.append(ramp.scale(p + "mlp/shared/wo_FD", 0, 0, cfg.num_shared_experts * cfg.shared_d_ff))
  return out


@growth_op
def insert_blocks(cfg, *, positions: int | Sequence[int], num_experts: int = 0, ramp_steps: int = 0,
                  init: Literal["zeros", "random"] = "zeros") -> Plan:
  """Insert fresh blocks; `positions` are their indices in the NEW stack (e.g. [1] in a 2-layer
  model: old 0 -> 0, new block at 1, old 1 -> 2). Output projections (attn wo_HAD, MLP wo_FD /
  wo_EFD, shared wo) are zero, so each new pre-norm block is the identity: exact. Other weights
  at the model's init scale, norms 1. New blocks are dense, or MoE with `num_experts` experts.
  Old MoE layers keep their expert counts at their shifted indices. New leaves: zero moments.
  ramp_steps=N > 0 (ramped growth, MSG): the output projections are at init scale too, and the
  new blocks' whole output projections are times a mask m = 0 -> 1 over N steps: exact at m = 0,
  the plain grown model at m = 1 (moegrow.params.ramp).
  init="random" (an ablation: NOT function-preserving): the output projections at init scale and
  no mask, so the new blocks change the function at once."""
  _refuse_ramped(cfg, "insert_blocks")
  if init not in ("zeros", "random"):
    raise ValueError(f"insert_blocks: init={init!r}; expected 'zeros' (exact) or 'random' (not preserving)")
  pos = sorted({int(positions)} if isinstance(positions, int) else {int(i) for i in positions})
  n = cfg.num_layers + len(pos)
  bad = [i for i in pos if not 0 <= i < n]
  if bad or (not isinstance(positions, int) and len(pos) != len(positions)):
    raise ValueError(f"insert_blocks: positions {list(positions) if not isinstance(positions, int) else positions} "
                     f"must be distinct indices in the new stack 0..{n - 1}")
  if num_experts < 0 or (num_experts and num_experts < cfg.top_k):
    raise ValueError(f"insert_blocks: num_experts={num_experts} must be 0 (dense) or >= top_k={cfg.top_k}")
  old_of = [i for i in range(n) if i not in pos]  # new index of old layer o: old_of[o]
  counts = {old_of[o]: e for o, e in expert_counts(cfg).items()}
  counts.update({j: num_experts for j in pos if num_experts})
  new_cfg = cfg.replace(num_layers=n, **moe_fields(counts, n))
  new_cfg, name = _ramped(cfg, new_cfg, "insert_blocks", ramp_steps,
                          [t for j in pos for t in _block_targets(cfg, j, num_experts)])
  rules = [(f"ramp/{name}", R.init("zeros"))] if name else []
  for j in range(n):
    rules += (_new_block_rules(cfg, j, bool(name) or init == "random") if j in pos
              else [(f"blocks/{j}/(.*)", R.copy(f"blocks/{old_of.index(j)}/\\1"))])
  rules.append((".*", R.copy()))
  return Plan(new_cfg, lambda key: rules, exact=bool(name) or init == "zeros")


@growth_op
def stack(cfg, *, times: int = 2) -> Plan:
  """G_stack (Du et al. 2024): repeat the layer stack, L -> times*L, new layer j = old j mod L
  (0,1 -> 0,1,0,1), MoE layers and expert counts included. Not function-preserving.
  Moments: every copy carries its source's; with 'reset' the duplicates (j >= L) get zeros."""
  _refuse_ramped(cfg, "stack")
  if times < 1:
    raise ValueError(f"stack: times={times} must be >= 1")
  L = cfg.num_layers
  n = L * times
  counts = {j: cfg.experts_in_layer(j % L) for j in range(n)}
  new_cfg = cfg.replace(num_layers=n, **moe_fields(counts, n))
  rules = []
  for j in range(n):
    act = R.copy(f"blocks/{j % L}/\\1")
    if j >= L:
      act = dataclasses.replace(act, name="duplicate", preserves=False)
    rules.append((f"blocks/{j}/(.*)", act))
  rules.append((".*", R.copy()))
  return Plan(new_cfg, lambda key: rules, exact=times == 1)


# ---------------------------------------------------------------- width

def _net2wider(idx, f_old, axis, out_proj, noise_std, noise_key):
  """Gather hidden units idx along `axis`; outgoing rows divided by their replication count."""
  count = jnp.zeros((f_old,), jnp.float32).at[idx].add(1.0)[idx]

  def fn(kind, kk, w):
    x = jnp.take(w, idx, axis=axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    if out_proj:
      n = count.reshape(shape)
      return x / (n * n if kind in R.SQUARED else n)
    if kind == "params" and noise_std > 0:  # optional symmetry breaking on the extra units
      extra = (jnp.arange(idx.shape[0]) >= f_old).astype(x.dtype).reshape(shape)
      x = x + extra * noise_std * jnp.std(w) * jax.random.normal(noise_key, x.shape, x.dtype)
    return x
  return fn


@growth_op
def widen_mlp(cfg, *, d_ff: int | None = None, expert_d_ff: int | None = None,
              shared_d_ff: int | None = None, method: Literal["random", "round_robin", "fresh"] = "random",
              noise_std: float = 0.0, ramp_steps: int = 0) -> Plan:
  """Net2WiderNet on MLP hidden widths: dense d_ff, experts' expert_d_ff, shared_d_ff (each
  optional; all layers of that kind). Index map per layer (shared by a layer's experts): units
  0..f-1 are kept, each extra unit copies unit (j - f) mod f ('round_robin') or a uniformly
  random one ('random'); the outgoing rows (wo) of every unit are divided by its replication
  count n. Exact without noise (noise_std > 0 adds noise of that relative std to the extra units'
  input columns). Moments: input columns carry; divided rows scale mu by 1/n, nu by 1/n^2.
  ramp_steps=N > 0 (ramped growth, MSG): no copies; the old units stay as they are and the new
  ones are fresh at init scale (input columns N(0, 1/d), output rows N(0, 1/f')), their output
  rows times a mask m = 0 -> 1 over N steps: exact at m = 0, the plain grown model at m = 1
  (moegrow.params.ramp; `method` is unused). New slices: zero moments.
  method="fresh" without a ramp (an ablation: NOT function-preserving): the same fresh new units,
  unmasked, so they change the function at once."""
  _refuse_ramped(cfg, "widen_mlp")
  sizes = {"d_ff": (cfg.d_ff, d_ff), "expert_d_ff": (cfg.expert_d_ff, expert_d_ff),
           "shared_d_ff": (cfg.shared_d_ff, shared_d_ff)}
  shrink = {n: v for n, v in sizes.items() if v[1] is not None and v[1] < v[0]}
  if shrink:
    raise ValueError("widen_mlp: cannot shrink " + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in shrink.items()))
  if all(v[1] is None for v in sizes.values()):
    raise ValueError("widen_mlp: give at least one of d_ff, expert_d_ff, shared_d_ff")
  new = {n: (v[1] if v[1] is not None else v[0]) for n, v in sizes.items()}
  if method == "fresh" and noise_std:
    raise ValueError(f"widen_mlp: noise_std={noise_std} perturbs Net2Wider copies; method='fresh' makes no copies")
  if ramp_steps and noise_std:
    raise ValueError(f"widen_mlp: noise_std={noise_std} perturbs Net2Wider copies; with ramp_steps the new units "
                     "are fresh (no copies), so use noise_std=0")
  parts = _mlp_parts(cfg, new)
  targets = [ramp.scale(p + f"wo_{outs}", len(outs) - 2, f, f2) for p, ins, outs, f, f2 in parts]
  new_cfg, name = _ramped(cfg, cfg.replace(**new), "widen_mlp", ramp_steps, targets)
  if name:
    return Plan(new_cfg, lambda key: _fresh_units_rules(cfg, parts, name), exact=True,
                note=f"ramp {name!r}: the new units' output rows are times m = 0 -> 1 over {ramp_steps} steps")
  if method == "fresh":
    return Plan(new_cfg, lambda key: _fresh_units_rules(cfg, parts, None), exact=False,
                note="fresh new units at init scale, no mask: not function-preserving")
  if method not in ("random", "round_robin"):
    raise ValueError(f"widen_mlp: method={method!r}; expected 'random', 'round_robin' or 'fresh'")
  return Plan(new_cfg, lambda key: _widen_mlp_rules(cfg, new, method, noise_std, key),
              exact=noise_std == 0)


def _mlp_parts(cfg, new) -> list[tuple[str, str, str, int, int]]:
  """(leaf prefix, input suffix, output suffix, f, f') of every MLP part `new` widens."""
  s = cfg.num_shared_experts
  out = []
  for i in range(cfg.num_layers):
    p = f"blocks/{i}/mlp/"
    if not cfg.experts_in_layer(i):
      out.append((p, "DF", "FD", cfg.d_ff, new["d_ff"]))
      continue
    out.append((p, "EDF", "EFD", cfg.expert_d_ff, new["expert_d_ff"]))
    if s:
      out.append((p + "shared/", "DF", "FD", s * cfg.shared_d_ff, s * new["shared_d_ff"]))
  return [x for x in out if x[4] != x[3]]


def _fresh_units_rules(cfg, parts, name):
  """widen_mlp with fresh units (ramped, or method='fresh'): old units copied into the leading
  corner, new ones at init scale."""
  rules = [(f"ramp/{name}", R.init("zeros"))] if name else []
  for p, ins, outs, f, f2 in parts:
    rules += [(p + f"{nm}_{ins}", R.pad(r"\g<0>", "normal", std=fan_in_std(cfg.d_model))) for nm in mlp_names(cfg)]
    rules.append((p + f"wo_{outs}", R.pad(r"\g<0>", "normal", std=fan_in_std(f2))))
  return rules + [(".*", R.copy())]


def _widen_mlp_rules(cfg, new, method, noise_std, key):
  s = cfg.num_shared_experts
  rules = []
  names = mlp_names(cfg)
  for i in range(cfg.num_layers):
    moe = cfg.experts_in_layer(i) > 0
    parts = [("", "DF", "FD", cfg.d_ff, new["d_ff"])] if not moe else [("", "EDF", "EFD", cfg.expert_d_ff,
                                                                         new["expert_d_ff"])]
    if moe and s:
      parts.append(("shared/", "DF", "FD", s * cfg.shared_d_ff, s * new["shared_d_ff"]))
    for n_part, (sub, ins, outs, f, f2) in enumerate(parts):
      if f2 == f:
        continue
      k = jax.random.fold_in(jax.random.fold_in(key, i), n_part)
      extra = (jnp.arange(f2 - f) % f if method == "round_robin"
               else jax.random.randint(k, (f2 - f,), 0, f))
      idx = jnp.concatenate([jnp.arange(f), extra]).astype(jnp.int32)
      p = f"blocks/{i}/mlp/{sub}"
      for j, nm in enumerate(names):
        fn = _net2wider(idx, f, len(ins) - 1, False, noise_std, jax.random.fold_in(k, 10 + j))
        rules.append((p + f"{nm}_{ins}", R.compute([p + f"{nm}_{ins}"], fn, "net2wider_in")))
      fn = _net2wider(idx, f, len(outs) - 2, True, 0.0, None)
      rules.append((p + f"wo_{outs}", R.compute([p + f"wo_{outs}"], fn, "net2wider_out")))
  rules.append((".*", R.copy()))
  return rules


@growth_op
def add_heads(cfg, *, num_heads: int, ramp_steps: int = 0) -> Plan:
  """H -> H' query heads of the same head_dim in every layer, added as whole key/value groups:
  with grouped-query attention (U key/value heads, g = H/U query heads each) H' must be a
  multiple of g and U -> H'/g (multi-head: U = H -> H'). New q/k/v heads at init scale (biases
  zero, head-wise qk-norm weights shared), new output-projection heads zero, so they add
  nothing: exact. Query heads inside existing groups are not added: that changes g, and so which
  key/value head every later query head reads. qk_norm="proj" (one norm over all heads) is refused:
  new heads change every head's normaliser. New slices: zero moments.
  ramp_steps=N > 0 (ramped growth, MSG): the new output-projection heads are at init scale too
  (N(0, 1/(H' A))), times a mask m = 0 -> 1 over N steps: exact at m = 0, the plain grown model
  at m = 1 (moegrow.params.ramp)."""
  _refuse_ramped(cfg, "add_heads")
  if num_heads < cfg.num_heads:
    raise ValueError(f"add_heads: cannot shrink num_heads {cfg.num_heads} -> {num_heads}")
  group = cfg.num_heads // cfg.num_kv_heads
  if num_heads % group:
    raise ValueError(f"add_heads: num_heads={num_heads} must be a multiple of the {group} query heads per "
                     f"key/value group (num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}): heads are "
                     "added as whole groups")
  if cfg.qk_norm == "proj" and num_heads > cfg.num_heads:
    raise ValueError("add_heads: qk_norm='proj' normalises q over all heads at once, so new heads would change "
                     "the old heads' outputs; not exact")
  new_cfg = cfg.replace(num_heads=num_heads, num_kv_heads=num_heads // group, head_dim=cfg.head_dim)
  targets = ([ramp.scale(f"blocks/{i}/attn/wo_HAD", 0, cfg.num_heads, num_heads) for i in range(cfg.num_layers)]
             if num_heads > cfg.num_heads else [])
  new_cfg, name = _ramped(cfg, new_cfg, "add_heads", ramp_steps, targets)
  wo = R.pad(r"\g<0>", "normal", std=fan_in_std(num_heads, cfg.head_dim)) if name else R.pad(r"\g<0>", "zeros")
  rules = ([(f"ramp/{name}", R.init("zeros"))] if name else []) + [
      (r"blocks/\d+/attn/w[qkv]_D[HU]A", R.pad(r"\g<0>", "normal", std=fan_in_std(cfg.d_model))),
      (r"blocks/\d+/attn/wo_HAD", wo),
      (r"blocks/\d+/attn/b[qkv]_[HU]A", R.pad(r"\g<0>", "zeros")),
      (".*", R.copy())]
  return Plan(new_cfg, lambda key: rules, exact=True)


@growth_op
def widen_model(cfg, *, d_model: int) -> Plan:
  """d -> d' (MSG, Yao et al. 2024), exact. The residual stream is zero-padded: new embedding
  columns and every new output-projection column (attn wo_HAD, MLP/expert/shared wo) are zero,
  new input-projection rows (q/k/v, wact/wlin, router, untied head) random: they read zeros.
  RMS over d' of a zero-padded vector is sqrt(d/d') times the RMS over d, so norm_eps becomes
  eps*d/d' (then exactly so) and RMSNorm gains are multiplied by c = sqrt(d/d') (new entries c).
  Tied logits divide by sqrt(d_model): the final-norm gain is left as is (its c and the
  divisor's sqrt(d'/d) cancel), new entries 1 (tied_logit_scale=False: rescaled like untied).
  Scaled gains scale mu by c and nu by c^2."""
  _refuse_ramped(cfg, "widen_model")
  d, d2 = cfg.d_model, d_model
  if d2 < d:
    raise ValueError(f"widen_model: cannot shrink d_model {d} -> {d2}")
  c = math.sqrt(d / d2)
  new_cfg = cfg.replace(d_model=d2, head_dim=cfg.head_dim, norm_eps=cfg.norm_eps * d / d2)
  g = r"\g<0>"
  final = (R.pad(g, "constant", value=1.0) if cfg.tie_embeddings and cfg.tied_logit_scale
           else R.pad(g, "constant", value=c, scale=c))
  rules = [("embed_VD", R.pad(g, "zeros")),
           ("head_DV", R.pad(g, "normal", std=fan_in_std(d2))),
           ("final_norm/scale_D", final),
           (r"blocks/\d+/(attn_norm|mlp_norm)/scale_D", R.pad(g, "constant", value=c, scale=c)),
           (r"blocks/\d+/attn/w[qkv]_D[HU]A", R.pad(g, "normal", std=fan_in_std(d2))),
           (r"blocks/\d+/attn/wo_HAD", R.pad(g, "zeros")),
           (r"blocks/\d+/mlp/(shared/)?w(act|lin)_DF", R.pad(g, "normal", std=fan_in_std(d2))),
           (r"blocks/\d+/mlp/w(act|lin)_EDF", R.pad(g, "normal", std=fan_in_std(d2))),
           (r"blocks/\d+/mlp/router_DE", R.pad(g, "normal", std=cfg.router_init_std)),
           (r"blocks/\d+/mlp/shared_gate_D", R.pad(g, "zeros")),
           (r"blocks/\d+/mlp/(shared/)?wo_FD", R.pad(g, "zeros")),
           (r"blocks/\d+/mlp/wo_EFD", R.pad(g, "zeros")),
           (".*", R.copy())]
  return Plan(new_cfg, lambda key: rules, exact=True)
