"""What a growth op is: a pure function from a config and static arguments to a `Plan`.

    @growth_op
    def upcycle(cfg, *, layers="all", num_experts=None, ...) -> Plan

A `Plan` holds the new config (computed from `cfg` and the arguments alone: no arrays, no
tracing) and `rules(key)`, the declarative rule set (`moegrow.surgery.rules`) that builds every
leaf of the new tree from the old one. `moegrow.surgery.apply` runs the rules on params and Adam
moments. Data-dependent inputs (expert loads, ...) are plain arguments measured elsewhere.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import types
import typing
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import numpy as np

from moegrow.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Plan:
  """new_cfg: the grown model's config; rules(key) -> [(pattern, Action)] over param paths;
  exact: whether the op preserves the function for these arguments; note: caveats for the
  report; extra: more JSON-serialisable report fields (e.g. add_experts' sources)."""
  new_cfg: ModelConfig
  rules: Callable[[Any], list]
  exact: bool
  note: str = ""
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def conforms(v, tp) -> bool:
  """Whether value `v` fits the annotation `tp` (the subset of typing the ops use)."""
  if tp is Any:
    return True
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (Union, types.UnionType):
    return any(conforms(v, a) for a in args)
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
    return isinstance(v, (list, tuple)) and all(conforms(x, args[0] if args else Any) for x in v)
  if origin in (collections.abc.Mapping, dict):
    kt, vt = args if args else (Any, Any)
    return isinstance(v, Mapping) and all(conforms(a, kt) and conforms(b, vt) for a, b in v.items())
  return isinstance(v, tp)


# Op arguments renamed in 0.6.0: {op: {old: new}}. An old name is refused with the new one.
RENAMED_ARGS = {"add_lora": {"alpha": "lora_alpha"}}


def growth_op(fn):
  """Checks an op's keyword arguments (names and types from its annotations) and its config."""
  sig = inspect.signature(fn)
  hints = typing.get_type_hints(fn)
  names = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]

  @functools.wraps(fn)
  def wrapper(cfg, **args) -> Plan:
    unknown = sorted(set(args) - set(names))
    renamed = {k: v for k, v in RENAMED_ARGS.get(fn.__name__, {}).items() if k in unknown}
    if renamed:
      raise ValueError(f"{fn.__name__}: argument(s) renamed in moegrow 0.6.0: "
                       + ", ".join(f"{k} is now {v}" for k, v in renamed.items()))
    if unknown:
      raise ValueError(f"{fn.__name__}: unknown argument(s) {unknown}; valid: {names}")
    for n, v in args.items():
      if not conforms(v, hints[n]):
        raise ValueError(f"{fn.__name__}: argument {n}={v!r} must be {fn.__annotations__[n]}")
    if not isinstance(cfg, ModelConfig):
      raise ValueError(f"{fn.__name__}: cfg must be a ModelConfig, got {type(cfg).__name__}")
    return fn(cfg, **args)

  wrapper.arg_names = tuple(names)
  return wrapper


# ---------------------------------------------------------------- config helpers shared by ops

Layers = Union[Literal["all", "every_other"], int, Sequence[int]]


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


def mlp_names(cfg: ModelConfig) -> tuple[str, ...]:
  """MLP input matrices: `wact` (the activated branch) and, for SwiGLU, `wlin` (the linear one)."""
  return ("wact", "wlin") if cfg.mlp_act == "swiglu" else ("wact",)
