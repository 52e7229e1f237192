"""Pure-dict tree helpers and a small declarative rules engine for checkpoint surgery.

Trees are nested dicts with string keys; a leaf's path is its keys joined by '/'
(`blocks/1/mlp/wi_EDF`). A rule set maps every TARGET leaf to how it is made:

  rules = [(r"blocks/(\\d+)/mlp/wi_EDF", stack(r"blocks/\\1/mlp/wi_DF", n=8)),
           (r"blocks/\\d+/mlp/router_DE", init("normal", std=0.02)),
           (r"blocks/\\d+/mlp/wi_DF", drop()),          # a SOURCE path, explicitly unused
           (r".*", copy())]                             # everything else: same path

Patterns are `re.fullmatch`ed; the first matching non-drop rule produces a target leaf, and
source templates are expanded with that match (`\\1`, `\\g<0>`). `drop()` rules match SOURCE
paths. `apply_rules` is strict (DESIGN.md, "fail loudly"): every target leaf is produced at its
exact shape and dtype, and every source leaf is used or dropped; otherwise one ValueError lists
every offending path.

An action is evaluated once per tree kind: `"params"`, or the Adam moments `"mu"` / `"nu"`.
Copies treat all kinds alike; `init` gives zeros for moments (a new slice has no history);
a `scale` c multiplies params and mu by c and nu by c**2. Actions are jittable: only arrays
are traced, patterns and shapes are static.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

SEP = "/"
KINDS = ("params", "mu", "nu")
DISTS = ("normal", "zeros", "ones", "constant")


# ---------------------------------------------------------------- flatten / unflatten

def flatten(tree: Mapping, sep: str = SEP) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Keys must be strings without `sep`; None leaves are kept."""
  out: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      if not isinstance(k, str) or sep in k or not k:
        raise ValueError(f"flatten: key {k!r} under '{prefix}' must be a non-empty str without {sep!r}")
      path = f"{prefix}{sep}{k}" if prefix else k
      if isinstance(v, Mapping):
        walk(v, path)
      else:
        out[path] = v

  walk(tree, "")
  return out


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict:
  """Inverse of `flatten`."""
  out: dict = {}
  for path, v in flat.items():
    *parents, last = path.split(sep)
    node = out
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"unflatten: '{path}' is below a leaf")
    if last in node:
      raise ValueError(f"unflatten: '{path}' given twice or is a prefix of another path")
    node[last] = v
  return out


def natural_key(path: str):
  """Sort key with numbers compared as numbers: blocks/2 < blocks/10."""
  return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in re.split(r"(\d+)", path)]


def shape_dtype(tree: Mapping) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.dtype(v.dtype)) for k, v in flatten(tree).items()}


def check_tree(tree: Mapping, abstract: Mapping, what: str = "tree", check_dtype: bool = True) -> None:
  """ValueError listing missing, unexpected and mis-shaped (or mis-typed) leaves of `tree`."""
  have, want = flatten(tree), flatten(abstract)
  problems = []
  missing = sorted(set(want) - set(have), key=natural_key)
  extra = sorted(set(have) - set(want), key=natural_key)
  if missing:
    problems.append(f"missing leaves: {missing}")
  if extra:
    problems.append(f"unexpected leaves: {extra}")
  for p in sorted(set(want) & set(have), key=natural_key):
    h, w = have[p], want[p]
    if tuple(h.shape) != tuple(w.shape) or (check_dtype and jnp.dtype(h.dtype) != jnp.dtype(w.dtype)):
      problems.append(f"{p}: got {tuple(h.shape)} {jnp.dtype(h.dtype)}, want {tuple(w.shape)} {jnp.dtype(w.dtype)}")
  if problems:
    raise ValueError(f"{what} does not match its config:\n  " + "\n  ".join(problems))


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


def _scaled(x, kind, scale):
  if scale is None:
    return x
  return x * (scale ** 2 if kind == "nu" else scale)


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
                lambda kind, key, s, want: _scaled(s[0], kind, scale), preserves=scale is None)


def stack(src: str, n: int, axis: int = 0) -> Action:
  """n copies stacked on a NEW axis (dense MLP -> n identical experts)."""
  return Action("stack", (src,), lambda kind, key, s, want: jnp.stack([s[0]] * n, axis=axis))


def tile(src: str, reps: int, axis: int = 0) -> Action:
  """reps copies concatenated along an existing axis: [a, b] -> [a, b, a, b]."""
  return Action("tile", (src,), lambda kind, key, s, want: jnp.concatenate([s[0]] * reps, axis=axis))


def repeat(src: str, reps: int, axis: int = 0) -> Action:
  """Each entry repeated along an axis: [a, b] -> [a, a, b, b]."""
  return Action("repeat", (src,), lambda kind, key, s, want: jnp.repeat(s[0], reps, axis=axis))


def split(src: str, num: int, index: int, axis: int = 0) -> Action:
  """Piece `index` of `num` equal pieces along an axis."""
  return Action("split", (src,), lambda kind, key, s, want: jnp.split(s[0], num, axis=axis)[index])


def concat(srcs: Sequence[str], axis: int = 0) -> Action:
  return Action("concat", tuple(srcs), lambda kind, key, s, want: jnp.concatenate(s, axis=axis))


def pad(src: str, dist: str = "zeros", std: float = 1.0, value: float = 0.0, scale: float | None = None) -> Action:
  """Source (times `scale`) in the leading corner of the bigger target; the rest `init(dist)`
  (moments: carried corner, zero rest)."""
  def fn(kind, key, s, want):
    x = s[0]
    if any(a > b for a, b in zip(x.shape, want.shape)) or x.ndim != len(want.shape):
      raise ValueError(f"pad: source {tuple(x.shape)} does not fit in target {tuple(want.shape)}")
    base = (jnp.zeros(want.shape, want.dtype) if kind != "params"
            else _sample(dist, key, want.shape, want.dtype, std, 0.0, value))
    return base.at[tuple(slice(0, n) for n in x.shape)].set(_scaled(x, kind, scale).astype(want.dtype))
  return Action("pad", (src,), fn)


def compute(srcs: Sequence[str], fn: Callable, name: str = "compute") -> Action:
  """General leaf: `fn(kind, key, *arrays) -> array`; it handles moments itself."""
  return Action(name, tuple(srcs), lambda kind, key, s, want: fn(kind, key, *s))


def drop() -> Action:
  """Rule on SOURCE paths: these leaves are intentionally not used."""
  return Action("drop", drop=True)


Rule = tuple  # (pattern, Action)


# ---------------------------------------------------------------- engine

def _as_flat(tree: Mapping) -> dict[str, Any]:
  """Nested tree -> flat; an already flat {path: leaf} dict is returned as is."""
  if all(not isinstance(v, Mapping) for v in tree.values()):
    return dict(tree)
  return flatten(tree)


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
  src, want = _as_flat(source), _as_flat(target)
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
