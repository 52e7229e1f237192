"""Run growth ops on plain state dicts: params AND Adam moments, through each op's rules.

    state = {'params': P, 'mu': P-shaped tree or None, 'nu': P-shaped tree or None[, 'count']}
    grown_config(cfg, ops) -> new cfg                       (no arrays, no tracing)
    apply_ops(state, cfg, ops, key, shapes=...) -> (state, cfg, [report, ...])

`ops` is a list of {'op': name, **args, 'opt_state': 'carry' | 'reset'}. Surgery knows nothing
of the model: `shapes(cfg)` must return the abstract param tree of a config (for moegrow's
transformer, `moegrow.model.transformer.abstract_params`); every target leaf is built at exactly
those shapes. Moments: with 'carry' (default) each action decides (copies carry their source's
moments, scaled copies scale mu by c and nu by c^2, new slices are zeros); with 'reset' every
leaf that is not an unmodified copy gets zero moments. 'count' (the Adam step) passes through.
Reports are JSON-serialisable: op, args, opt_state, exact, note, old/new config and `map`
{target path: {'action', 'from': [source paths]}}.

Ramps (ramped growth, `moegrow.params.ramp`): an op given `ramp_steps` leaves its new units behind a mask
(params['ramp'], cfg.ramps). Before any other op runs on a model that carries ramps, `plans`
inserts the op `fold_ramps`, which bakes the masks into the weights (exact for any m; after a
finished ramp the weights are bit-identical) and drops them. A ramped op must therefore be the
last op of its list (only an explicit fold_ramps may follow it).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from moegrow.config import ModelConfig
from moegrow.params import ramp
from moegrow.params.trees import check_tree, flatten, json_leaf, to_plain, unflatten
from moegrow.surgery import rules as R
from moegrow.surgery.lora_ops import add_lora, merge_lora
from moegrow.surgery.moe_ops import add_experts, drop_upcycle, granular_upcycle, upcycle
from moegrow.surgery.op import Plan, growth_op
from moegrow.surgery.rebake import to_dense
from moegrow.surgery.shape_ops import add_heads, insert_blocks, stack, widen_mlp, widen_model
from moegrow.surgery.shrink_ops import merge_experts, prune_experts



@growth_op
def fold_ramps(cfg) -> Plan:
  """Bake every ramp's mask into its weights (`moegrow.params.ramp.fold`): the stored weights become the
  effective ones (W * m, b + max(log m, -1e4)) and params['ramp'] and cfg.ramps go. Exact for any
  m, bit-identical after a finished ramp (m = 1). Moments (and a Fisher) are carried unchanged;
  the masks have none. `plans` runs it before any other op on a model that carries ramps."""
  if not cfg.ramps:
    raise ValueError("fold_ramps: the model carries no ramps")
  items = ramp.by_path(cfg)

  def fold(path):
    names = sorted({n for n, _ in items[path]})

    def fn(kind, key, w, *masks):
      return ramp.fold_leaf(w, items[path], dict(zip(names, masks))) if kind == "params" else w
    return R.compute([path] + [f"{ramp.KEY}/{n}" for n in names], fn, "fold_ramps")

  def rules(key):
    return ([(re.escape(p), fold(p)) for p in items] + [(f"{ramp.KEY}/.*", R.drop()), (".*", R.copy())])

  return Plan(ramp.strip(cfg), rules, exact=True,
              note="the folded weights are the masked weights the ramped model computes with")


OPS = {f.__name__: f for f in (upcycle, granular_upcycle, drop_upcycle, add_experts, prune_experts, merge_experts,
                               insert_blocks, stack, widen_mlp, add_heads, widen_model, to_dense, add_lora, merge_lora,
                               fold_ramps)}
LORA_OPS = ("add_lora", "merge_lora")  # the only ops that see a model carrying adapters
STATE_KEYS = ("params", "mu", "nu", "count")
MOMENTS = ("mu", "nu")
OPT_STATES = ("carry", "reset")
Shapes = Callable[[ModelConfig], Mapping]


def parse_op(spec: Any, n: int = 0) -> tuple[str, dict, str]:
  """{'op': name, **args[, 'opt_state']} -> (name, args, opt_state), with errors naming op #n."""
  if not isinstance(spec, Mapping) or "op" not in spec:
    raise ValueError(f"growth op #{n} must be a dict with an 'op' key, got {spec!r}")
  name = spec["op"]
  if name not in OPS:
    raise ValueError(f"growth op #{n}: unknown growth op {name!r}; known: {sorted(OPS)}")
  args = {k: v for k, v in spec.items() if k not in ("op", "opt_state")}
  opt_state = spec.get("opt_state", "carry")
  if opt_state not in OPT_STATES:
    raise ValueError(f"growth op #{n} ({name}): argument opt_state={opt_state!r} must be one of {OPT_STATES}")
  return name, args, opt_state


def plans(cfg: ModelConfig, ops: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict, str, Plan]]:
  """Each op's (name, args, opt_state, Plan), planned in order on the config it will see. On a
  model that carries ramps, an automatic fold_ramps plan comes first (see the module doc)."""
  out = []
  ramped = None  # (n, name) of the op of this list that added the model's ramps
  for n, spec in enumerate(ops):
    name, args, opt_state = parse_op(spec, n)
    if cfg.lora_rank and name not in LORA_OPS:
      raise ValueError(f"growth op #{n} ({name}): the model carries LoRA adapters (lora_rank={cfg.lora_rank}); "
                       "growth ops do not carry adapters: fold them in first with {'op': 'merge_lora'}")
    if cfg.ramps and name != "fold_ramps":
      if ramped is not None:
        raise ValueError(f"growth op #{n} ({name}) follows op #{ramped[0]} ({ramped[1]}), which adds a ramp: the "
                         "ramp would be folded at m = 0 before it ever trains; a ramped op must be the last op "
                         "(of a stage, LoRA adapters included)")
      plan = fold_ramps(cfg)
      out.append(("fold_ramps", {}, "carry", plan))
      cfg = plan.new_cfg
    plan = OPS[name](cfg, **args)
    out.append((name, args, opt_state, plan))
    ramped = (n, name) if len(plan.new_cfg.ramps) > len(cfg.ramps) else None
    cfg = plan.new_cfg
  return out


def grown_config(cfg: ModelConfig, ops: Sequence[Mapping[str, Any]]) -> ModelConfig:
  """The config `ops` produce from `cfg`: pure config arithmetic, no arrays."""
  for *_, plan in plans(cfg, ops):
    cfg = plan.new_cfg
  return cfg


def run_plan(state: Mapping, cfg: ModelConfig, plan: Plan, target: Mapping, key, *, op: str = "", args=None,
             opt_state: str = "carry") -> tuple[dict, dict]:
  """Params and (if present) Adam moments through one plan's rules -> (new state, report)."""
  extra = sorted(set(state) - set(STATE_KEYS))
  if "params" not in state or extra:
    raise ValueError(f"{op}: state must be a dict with 'params' (and optional {list(STATE_KEYS[1:])}); "
                     f"got keys {sorted(state)}")
  rules = plan.rules(key)
  params, actions = R.apply_rules(state["params"], target, rules, key, "params")
  new = dict(state)
  new["params"] = params
  for kind in MOMENTS:
    m = state.get(kind)
    if m is None:
      continue
    dts = {jnp.dtype(x.dtype) for x in flatten(m).values()}
    dt = dts.pop() if len(dts) == 1 else None
    want = {p: jax.ShapeDtypeStruct(s.shape, dt or s.dtype) for p, s in flatten(target).items()}
    out, _ = R.apply_rules(m, want, rules, key, kind, check_dtype=dt is not None)
    if opt_state == "reset":
      flat = flatten(out)
      out = unflatten({p: x if actions[p][0].preserves else jnp.zeros_like(x) for p, x in flat.items()})
    new[kind] = out
  report = {"op": op, "args": to_plain(args or {}, json_leaf), "opt_state": opt_state, "exact": bool(plan.exact),
            "note": plan.note, "old_config": cfg.to_dict(), "new_config": plan.new_cfg.to_dict(),
            "map": R.describe_plan(actions), **to_plain(plan.extra, json_leaf)}
  return new, report


def validate_state(state: Mapping, cfg: ModelConfig, shapes: Shapes, what: str = "state") -> None:
  """ValueError unless params (and mu/nu, shapes only) match `shapes(cfg)` exactly."""
  want = shapes(cfg)
  check_tree(state["params"], want, f"{what} params")
  for kind in MOMENTS:
    if state.get(kind) is not None:
      check_tree(state[kind], want, f"{what} {kind}", check_dtype=False)


def apply_ops(state: Mapping, cfg: ModelConfig, ops: Sequence[Mapping[str, Any]], key=None, *, shapes: Shapes,
              jit: bool = False):
  """Apply growth ops in order; op n gets fold_in(key, n). With jit=True each op runs under
  jax.jit (arguments static, arrays traced). Every result is checked against shapes(new cfg).
  Returns (state, cfg, [report, ...])."""
  key = jax.random.PRNGKey(0) if key is None else key
  reports = []
  for n, (name, args, opt_state, plan) in enumerate(plans(cfg, ops)):
    target, k = shapes(plan.new_cfg), jax.random.fold_in(key, n)
    run = lambda s, kk: run_plan(s, cfg, plan, target, kk, op=name, args=args, opt_state=opt_state)
    if jit:
      box = {}

      def traced(s, kk):
        out, box["report"] = run(s, kk)
        return out
      state, report = jax.jit(traced)(state, k), None
      report = box["report"]
    else:
      state, report = run(state, k)
    validate_state(state, plan.new_cfg, shapes, f"after op #{n} ({name})")
    cfg = plan.new_cfg
    reports.append(report)
  return state, cfg, reports


def remap(tree: Mapping, cfg: ModelConfig, ops: Sequence[Mapping[str, Any]], key=None, *, shapes: Shapes,
          kind: str = "params"):
  """Carry any params-shaped tree through `ops` with the ops' own rules: kind 'params' (e.g. an
  EWC anchor), 'mu' / 'nu' (new slices 0; scaled copies times c or c^2) or 'fisher' (a diagonal
  Fisher: like 'nu', and new experts get 0 even where they copy old ones). The same key as
  `apply_ops` gives the same new weights."""
  key = jax.random.PRNGKey(0) if key is None else key
  for n, (name, _, _, plan) in enumerate(plans(cfg, ops)):
    k = jax.random.fold_in(key, n)
    dts = {jnp.dtype(x.dtype) for x in flatten(tree).values()}
    dt = dts.pop() if len(dts) == 1 else None
    want = {p: jax.ShapeDtypeStruct(s.shape, dt or s.dtype) for p, s in flatten(shapes(plan.new_cfg)).items()}
    tree, _ = R.apply_rules(tree, want, plan.rules(k), k, kind, check_dtype=dt is not None)
    cfg = plan.new_cfg
  return tree
