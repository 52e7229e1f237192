"""Growth operations: pure functions on plain dicts (params AND Adam moments), and a driver.

State: {'params': P, 'mu': P-shaped tree or None, 'nu': P-shaped tree or None} (optionally
'count', passed through: ops never touch the Adam step). Every op is

    op(state, cfg, key, **args) -> (new_state, new_cfg, report)

with `cfg` a ModelConfig, `key` a jax.random key (None: PRNGKey(0)) and keyword args that are
static (jit the op with a closure: only arrays are traced). `report` is JSON-serialisable: op,
args, opt_state, exact (whether the op preserves the function for these args), old/new config
and `map` {target path: {'action', 'from': [source paths]}}. Every op takes
opt_state='carry' (copies carry moments, Net2Wider-divided rows scale mu by 1/n and nu by 1/n^2,
new slices zero) or 'reset' (every leaf the op changed gets zero moments).

    apply_ops(state, cfg, [{'op': 'upcycle', 'num_experts': 8}, ...], key) -> (state, cfg, reports)

Ops (DESIGN.md section 3): upcycle, granular_upcycle, drop_upcycle, add_experts (grow_ops.py);
insert_blocks, stack, widen_mlp, add_heads, widen_model (here).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp

from moegrow import tree as T
from moegrow.config import ModelConfig
from moegrow.grow_ops import (OptState, add_experts, drop_upcycle, expert_counts, fan_in, granular_upcycle,
                              growth_op, moe_fields, run_rules, upcycle)
from moegrow.transformer import abstract_params

__all__ = ["OPS", "apply_ops", "upcycle", "granular_upcycle", "drop_upcycle", "add_experts", "insert_blocks",
           "stack", "widen_mlp", "add_heads", "widen_model", "validate_state"]


# ---------------------------------------------------------------- depth

def _new_block_rules(cfg: ModelConfig, j: int):
  """A fresh block whose residual contributions are 0: output projections zero, rest at init."""
  p, d = f"blocks/{j}/", cfg.d_model
  return [(p + "(attn_norm|mlp_norm)/scale_D", T.init("ones")),
          (p + "attn/w[qkv]_DHA", T.init("normal", std=fan_in(d))),
          (p + "attn/wo_HAD", T.init("zeros")),
          (p + "mlp/(shared/)?w[ig]_DF", T.init("normal", std=fan_in(d))),
          (p + "mlp/(shared/)?wo_FD", T.init("zeros")),
          (p + "mlp/w[ig]_EDF", T.init("normal", std=fan_in(d))),
          (p + "mlp/wo_EFD", T.init("zeros")),
          (p + "mlp/router_DE", T.init("normal", std=cfg.router_init_std)),
          (p + "mlp/router_bias_E", T.init("zeros"))]


@growth_op
def insert_blocks(state, cfg, key, *, positions: int | Sequence[int], num_experts: int = 0,
                  opt_state: OptState = "carry"):
  """Insert fresh blocks; `positions` are their indices in the NEW stack (e.g. [1] in a 2-layer
  model: old 0 -> 0, new block at 1, old 1 -> 2). Output projections (attn wo_HAD, MLP wo_FD /
  wo_EFD, shared wo) are zero, so each new pre-norm block is the identity: exact. Other weights
  at the model's init scale, norms 1. New blocks are dense, or MoE with `num_experts` experts.
  Old MoE layers keep their expert counts at their shifted indices. New leaves: zero moments."""
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
  rules = []
  for j in range(n):
    rules += _new_block_rules(cfg, j) if j in pos else [(f"blocks/{j}/(.*)", T.copy(f"blocks/{old_of.index(j)}/\\1"))]
  rules.append((".*", T.copy()))
  args = dict(positions=positions, num_experts=num_experts)
  return run_rules(state, cfg, new_cfg, rules, key, op="insert_blocks", args=args, opt_state=opt_state,
                   exact=True)


@growth_op
def stack(state, cfg, key, *, times: int = 2, opt_state: OptState = "carry"):
  """G_stack (Du et al. 2024): repeat the layer stack, L -> times*L, new layer j = old j mod L
  (0,1 -> 0,1,0,1), MoE layers and expert counts included. Not function-preserving.
  Moments: every copy carries its source's; with 'reset' the duplicates (j >= L) get zeros."""
  if times < 1:
    raise ValueError(f"stack: times={times} must be >= 1")
  L = cfg.num_layers
  n = L * times
  counts = {j: cfg.experts_in_layer(j % L) for j in range(n)}
  new_cfg = cfg.replace(num_layers=n, **moe_fields(counts, n))
  rules = []
  for j in range(n):
    act = T.copy(f"blocks/{j % L}/\\1")
    if j >= L:
      act = dataclasses.replace(act, name="duplicate", preserves=False)
    rules.append((f"blocks/{j}/(.*)", act))
  rules.append((".*", T.copy()))
  return run_rules(state, cfg, new_cfg, rules, key, op="stack", args=dict(times=times), opt_state=opt_state,
                   exact=times == 1)


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
      return x / (n * n if kind == "nu" else n)
    if kind == "params" and noise_std > 0:  # optional symmetry breaking on the extra units
      extra = (jnp.arange(idx.shape[0]) >= f_old).astype(x.dtype).reshape(shape)
      x = x + extra * noise_std * jnp.std(w) * jax.random.normal(noise_key, x.shape, x.dtype)
    return x
  return fn


@growth_op
def widen_mlp(state, cfg, key, *, d_ff: int | None = None, expert_d_ff: int | None = None,
              shared_d_ff: int | None = None, method: Literal["random", "round_robin"] = "random",
              noise_std: float = 0.0, opt_state: OptState = "carry"):
  """Net2WiderNet on MLP hidden widths: dense d_ff, experts' expert_d_ff, shared_d_ff (each
  optional; all layers of that kind). Index map per layer (shared by a layer's experts): units
  0..f-1 are kept, each extra unit copies unit (j - f) mod f ('round_robin') or a uniformly
  random one ('random'); the outgoing rows (wo) of every unit are divided by its replication
  count n. Exact without noise (noise_std > 0 adds noise of that relative std to the extra units'
  input columns). Moments: input columns carry; divided rows scale mu by 1/n, nu by 1/n^2."""
  sizes = {"d_ff": (cfg.d_ff, d_ff), "expert_d_ff": (cfg.expert_d_ff, expert_d_ff),
           "shared_d_ff": (cfg.shared_d_ff, shared_d_ff)}
  shrink = {n: v for n, v in sizes.items() if v[1] is not None and v[1] < v[0]}
  if shrink:
    raise ValueError("widen_mlp: cannot shrink " + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in shrink.items()))
  if all(v[1] is None for v in sizes.values()):
    raise ValueError("widen_mlp: give at least one of d_ff, expert_d_ff, shared_d_ff")
  new = {n: (v[1] if v[1] is not None else v[0]) for n, v in sizes.items()}
  new_cfg = cfg.replace(**new)
  s = cfg.num_shared_experts
  rules = []
  names = ("wi", "wg") if cfg.mlp_act == "swiglu" else ("wi",)
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
        rules.append((p + f"{nm}_{ins}", T.compute([p + f"{nm}_{ins}"], fn, "net2wider_in")))
      fn = _net2wider(idx, f, len(outs) - 2, True, 0.0, None)
      rules.append((p + f"wo_{outs}", T.compute([p + f"wo_{outs}"], fn, "net2wider_out")))
  rules.append((".*", T.copy()))
  args = dict(d_ff=d_ff, expert_d_ff=expert_d_ff, shared_d_ff=shared_d_ff, method=method, noise_std=noise_std)
  return run_rules(state, cfg, new_cfg, rules, key, op="widen_mlp", args=args, opt_state=opt_state,
                   exact=noise_std == 0)


@growth_op
def add_heads(state, cfg, key, *, num_heads: int, opt_state: OptState = "carry"):
  """H -> H' heads of the same head_dim in every layer: new q/k/v heads at init scale, new
  output-projection heads zero, so they add nothing: exact. New slices: zero moments."""
  if num_heads < cfg.num_heads:
    raise ValueError(f"add_heads: cannot shrink num_heads {cfg.num_heads} -> {num_heads}")
  new_cfg = cfg.replace(num_heads=num_heads, head_dim=cfg.head_dim)
  rules = [(r"blocks/\d+/attn/w[qkv]_DHA", T.pad(r"\g<0>", "normal", std=fan_in(cfg.d_model))),
           (r"blocks/\d+/attn/wo_HAD", T.pad(r"\g<0>", "zeros")),
           (".*", T.copy())]
  return run_rules(state, cfg, new_cfg, rules, key, op="add_heads", args=dict(num_heads=num_heads),
                   opt_state=opt_state, exact=True)


@growth_op
def widen_model(state, cfg, key, *, d_model: int, opt_state: OptState = "carry"):
  """d -> d' (MSG, Yao et al. 2024), exact. The residual stream is zero-padded: new embedding
  columns and every new output-projection column (attn wo_HAD, MLP/expert/shared wo) are zero,
  new input-projection rows (q/k/v, wi/wg, router, untied head) random: they read zeros.
  RMS over d' of a zero-padded vector is sqrt(d/d') times the RMS over d, so norm_eps becomes
  eps*d/d' (then exactly so) and RMSNorm gains are multiplied by c = sqrt(d/d') (new entries c).
  Tied logits divide by sqrt(d_model): the final-norm gain is left as is (its c and the
  divisor's sqrt(d'/d) cancel), new entries 1. Scaled gains scale mu by c and nu by c^2."""
  d, d2 = cfg.d_model, d_model
  if d2 < d:
    raise ValueError(f"widen_model: cannot shrink d_model {d} -> {d2}")
  c = math.sqrt(d / d2)
  new_cfg = cfg.replace(d_model=d2, head_dim=cfg.head_dim, norm_eps=cfg.norm_eps * d / d2)
  g = r"\g<0>"
  final = (T.pad(g, "constant", value=1.0) if cfg.tie_embeddings
           else T.pad(g, "constant", value=c, scale=c))
  rules = [("embed_VD", T.pad(g, "zeros")),
           ("head_DV", T.pad(g, "normal", std=fan_in(d2))),
           ("final_norm/scale_D", final),
           (r"blocks/\d+/(attn_norm|mlp_norm)/scale_D", T.pad(g, "constant", value=c, scale=c)),
           (r"blocks/\d+/attn/w[qkv]_DHA", T.pad(g, "normal", std=fan_in(d2))),
           (r"blocks/\d+/attn/wo_HAD", T.pad(g, "zeros")),
           (r"blocks/\d+/mlp/(shared/)?w[ig]_DF", T.pad(g, "normal", std=fan_in(d2))),
           (r"blocks/\d+/mlp/w[ig]_EDF", T.pad(g, "normal", std=fan_in(d2))),
           (r"blocks/\d+/mlp/router_DE", T.pad(g, "normal", std=cfg.router_init_std)),
           (r"blocks/\d+/mlp/(shared/)?wo_FD", T.pad(g, "zeros")),
           (r"blocks/\d+/mlp/wo_EFD", T.pad(g, "zeros")),
           (".*", T.copy())]
  return run_rules(state, cfg, new_cfg, rules, key, op="widen_model", args=dict(d_model=d_model),
                   opt_state=opt_state, exact=True)


# ---------------------------------------------------------------- registry and driver

OPS = {f.__name__: f for f in (upcycle, granular_upcycle, drop_upcycle, add_experts, insert_blocks, stack,
                               widen_mlp, add_heads, widen_model)}


def validate_state(state: Mapping, cfg: ModelConfig, what: str = "state") -> None:
  """ValueError unless params (and mu/nu, shapes only) match abstract_params(cfg) exactly."""
  want = abstract_params(cfg)
  T.check_tree(state["params"], want, f"{what} params")
  for kind in ("mu", "nu"):
    if state.get(kind) is not None:
      T.check_tree(state[kind], want, f"{what} {kind}", check_dtype=False)


def apply_ops(state: Mapping, cfg: ModelConfig, ops: Sequence[Mapping[str, Any]], key=None, *,
              jit: bool = False):
  """Apply growth ops in order: ops = [{'op': name, **args}, ...]. Op n gets fold_in(key, n).
  With jit=True each op runs under jax.jit (args static, arrays traced). The result of every op
  is checked against abstract_params(new_cfg). Returns (state, cfg, [report, ...])."""
  key = jax.random.PRNGKey(0) if key is None else key
  reports = []
  for n, spec in enumerate(ops):
    if not isinstance(spec, Mapping) or "op" not in spec:
      raise ValueError(f"apply_ops: op #{n} must be a dict with an 'op' key, got {spec!r}")
    name = spec["op"]
    if name not in OPS:
      raise ValueError(f"apply_ops: op #{n}: unknown growth op {name!r}; known: {sorted(OPS)}")
    args = {k: v for k, v in spec.items() if k != "op"}
    fn, k = OPS[name], jax.random.fold_in(key, n)
    if jit:
      static = {}

      def run(s, kk):
        out, static["cfg"], static["report"] = fn(s, cfg, kk, **args)
        return out
      state = jax.jit(run)(state, k)
      cfg, report = static["cfg"], static["report"]
    else:
      state, cfg, report = fn(state, cfg, k, **args)
    validate_state(state, cfg, f"after op #{n} ({name})")
    reports.append(report)
  return state, cfg, reports


def main(argv=None) -> None:
  """python -m moegrow.grow --from=<checkpoint> --config=<config of the grown run> --workdir=<new dir>"""
  from absl import app, flags, logging
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", None, "Config whose stage the checkpoint grows into.")
  src = flags.DEFINE_string("from", None, "A run's workdir, its checkpoints dir, or one step's dir.")
  workdir = flags.DEFINE_string("workdir", None, "New run directory for the grown checkpoint.")
  stage = flags.DEFINE_integer("stage", None, "Stage of the config to grow into (default: inferred).")
  flags.mark_flags_as_required(["config", "from", "workdir"])

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    logging.set_verbosity(logging.WARNING)
    from moegrow import boundary
    from moegrow.main import init_distributed
    init_distributed(config.value)  # multi-host: every process runs this command
    cert = boundary.grow_offline(config.value, src.value, workdir.value, stage.value)
    print(boundary.certificate_text(cert), flush=True)
  app.run(run, argv)


if __name__ == "__main__":
  main()
