"""A small declarative rules engine for checkpoint surgery on plain nested dicts.

A leaf's path is its keys joined by '/' (`blocks/1/mlp/wact_EDF`, see `moegrow.params.trees`).
A rule set maps every TARGET leaf to how it is made:

  rules = [(r"blocks/(\\d+)/mlp/wact_EDF", stack(r"blocks/\\1/mlp/wact_DF", n=8)),
           (r"blocks/\\d+/mlp/router_DE", init("normal", std=0.02)),
           (r"blocks/\\d+/mlp/wact_DF", drop()),          # a SOURCE path, explicitly unused
           (r".*", copy())]                             # everything else: same path

Patterns are `re.fullmatch`ed; the first matching non-drop rule produces a target leaf, and
source templates are expanded with that match (`\\1`, `\\g<0>`). `drop()` rules match SOURCE
paths. `apply_rules` is strict: every target leaf is produced at its
exact shape and dtype, and every source leaf is used or dropped; otherwise one ValueError lists
every offending path.

An action is evaluated once per tree kind: `"params"`, the Adam moments `"mu"` / `"nu"`, or
`"fisher"` (a diagonal Fisher, EWC's importance: like `"nu"`, except that ops adding new capacity
out of copies, e.g. add_experts, give the copies zero importance). Copies treat all kinds alike;
`init` gives zeros for every kind but params (a new slice has no history); a `scale` c
multiplies params and mu by c, nu and fisher by c**2. Actions are jittable: only arrays
are traced, patterns and shapes are static.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from moegrow.params.trees import flatten, natural_key, unflatten
KINDS = ("params", "mu", "nu", "fisher")
SQUARED = ("nu", "fisher")  # kinds that scale like a squared gradient: a scale c gives c**2
DISTS = ("normal", "zeros", "ones", "constant")


# ---------------------------------------------------------------- actions

@dataclasses.dataclass(frozen=True)
class Action:
  """How one target leaf is made. `sources` are templates expanded with the target's match;
  `fn(kind, key, srcs, want)` returns the leaf (`want`: its ShapeDtypeStruct).
  `preserves`: the leaf is an unmodified copy (keeps its moments when an op resets the others)."""
  name: str
  sources: tuple[str, ...] = ()
  fn: Callable | None = None
  preserves: bool = False
  drop: bool = False


def scaled(x, kind, scale):
  if scale is None:
    return x
  return x * (scale ** 2 if kind in SQUARED else scale)


def _sample(dist, key, shape, dtype, std=1.0, mean=0.0, value=0.0):
  if dist == "normal":
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  if dist == "zeros":
    return jnp.zeros(shape, dtype)
  if dist == "ones":
    return jnp.ones(shape, dtype)
  if dist == "constant":
    return jnp.full(shape, value, dtype)
  raise ValueError(f"init: unknown dist {dist!r} (normal, zeros, ones, constant)")


def init(dist: str = "normal", std: float = 1.0, mean: float = 0.0, value: float = 0.0) -> Action:
  """New leaf: 'normal' N(mean, std), 'zeros', 'ones' or 'constant' (value). Moments: zeros."""
  if dist not in DISTS:
    raise ValueError(f"init: unknown dist {dist!r}; one of {DISTS}")

  def fn(kind, key, srcs, want):
    if kind != "params":
      return jnp.zeros(want.shape, want.dtype)
    return _sample(dist, key, want.shape, want.dtype, std, mean, value)
  return Action(f"init:{dist}", (), fn)


def copy(src: str = r"\g<0>", scale: float | None = None) -> Action:
  """Copy one source leaf (default: the same path), optionally times `scale`."""
  return Action("copy" if scale is None else "scale", (src,),
                lambda kind, key, s, want: scaled(s[0], kind, scale), preserves=scale is None)


def stack(src: str, n: int, axis: int = 0) -> Action:
  """n copies stacked on a NEW axis (dense MLP -> n identical experts)."""
  return Action("stack", (src,), lambda kind, key, s, want: jnp.stack([s[0]] * n, axis=axis))


def tile(src: str, reps: int, axis: int = 0) -> Action:
  """reps copies concatenated along an existing axis: [a, b] -> [a, b, a, b]."""
  return Action("tile", (src,), lambda kind, key, s, want: jnp.concatenate([s[0]] * reps, axis=axis))


def pad(src: str, dist: str = "zeros", std: float = 1.0, value: float = 0.0, scale: float | None = None) -> Action:
  """Source (times `scale`) in the leading corner of the bigger target; the rest `init(dist)`
  (moments: carried corner, zero rest)."""
  def fn(kind, key, s, want):
    x = s[0]
    if any(a > b for a, b in zip(x.shape, want.shape)) or x.ndim != len(want.shape):
      raise ValueError(f"pad: source {tuple(x.shape)} does not fit in target {tuple(want.shape)}")
    base = (jnp.zeros(want.shape, want.dtype) if kind != "params"
            else _sample(dist, key, want.shape, want.dtype, std, 0.0, value))
    return base.at[tuple(slice(0, n) for n in x.shape)].set(scaled(x, kind, scale).astype(want.dtype))
  return Action("pad", (src,), fn)


def compute(srcs: Sequence[str], fn: Callable, name: str = "compute") -> Action:
  """General leaf: `fn(kind, key, *arrays) -> array`; it handles moments itself."""
  return Action(name, tuple(srcs), lambda kind, key, s, want: fn(kind, key, *s))


def drop() -> Action:
  """Rule on SOURCE paths: these leaves are intentionally not used."""
  return Action("drop", drop=True)


Rule = tuple  # (pattern, Action)


# ---------------------------------------------------------------- engine

def leaf_key(key, path: str):
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def plan_rules(source_paths: Sequence[str], target_paths: Sequence[str], rules: Sequence[Rule]):
  """Static part of `apply_rules`: {target: (Action, [source paths])}. Raises ValueError for
  target leaves without a rule, rules naming missing sources, and unused, undropped sources."""
  compiled = []
  for pat, act in rules:
    if not isinstance(act, Action):
      raise ValueError(f"rule {pat!r}: action must be an Action, got {type(act).__name__}")
    compiled.append((re.compile(pat), act))
  srcset = set(source_paths)
  plan, unmatched, missing = {}, [], []
  for t in sorted(target_paths, key=natural_key):
    for rx, act in compiled:
      m = None if act.drop else rx.fullmatch(t)
      if m:
        srcs = [m.expand(s) for s in act.sources]
        missing += [f"{t} <- {s} ({act.name})" for s in srcs if s not in srcset]
        plan[t] = (act, srcs)
        break
    else:
      unmatched.append(t)
  used = {s for _, srcs in plan.values() for s in srcs}
  drops = [rx for rx, act in compiled if act.drop]
  unused = sorted((s for s in srcset - used if not any(rx.fullmatch(s) for rx in drops)), key=natural_key)
  problems = []
  if unmatched:
    problems.append(f"target leaves produced by no rule: {unmatched}")
  if missing:
    problems.append(f"rules read source leaves that do not exist: {missing}")
  if unused:
    problems.append(f"source leaves neither used nor dropped: {unused}")
  if problems:
    raise ValueError("incomplete rule set:\n  " + "\n  ".join(problems))
  return plan


def apply_rules(source: Mapping, target: Mapping, rules: Sequence[Rule], key=None, kind: str = "params",
                check_dtype: bool = True):
  """Build the target tree from the source tree.

  source: nested dict (or flat {path: leaf}) of arrays; target: the same of anything with
  .shape/.dtype (e.g. `abstract_params(new_cfg)`); kind: "params", "mu" or "nu".
  Returns (nested target tree, {target path: (Action, [source paths])}).
  """
  if kind not in KINDS:
    raise ValueError(f"apply_rules: kind={kind!r} not in {KINDS}")
  src, want = flatten(source), flatten(target)
  plan = plan_rules(list(src), list(want), rules)
  key = jax.random.PRNGKey(0) if key is None else key
  out, bad = {}, []
  for t, (act, srcs) in plan.items():
    w = jax.ShapeDtypeStruct(tuple(want[t].shape), jnp.dtype(want[t].dtype))
    leaf = act.fn(kind, leaf_key(key, t), [src[s] for s in srcs], w)
    if tuple(leaf.shape) != w.shape or (check_dtype and jnp.dtype(leaf.dtype) != w.dtype):
      bad.append(f"{t} ({act.name} of {srcs}): got {tuple(leaf.shape)} {jnp.dtype(leaf.dtype)}, "
                 f"want {w.shape} {w.dtype}")
    out[t] = leaf
  if bad:
    raise ValueError("rules produced leaves of the wrong shape/dtype:\n  " + "\n  ".join(bad))
  return unflatten(out), plan


def describe_plan(plan) -> dict[str, dict]:
  """JSON-serialisable source -> target map: {target: {'action': name, 'from': [sources]}}."""
  return {t: {"action": act.name, "from": list(srcs)} for t, (act, srcs) in plan.items()}
