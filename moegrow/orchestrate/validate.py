"""One validation pass over a run config before anything is built or trained.

`validate_config(config, num_devices)` checks every field's type and range (model, data, train,
mesh, stages, growth ops, frozen patterns, the tokenizer against the embedding rows) and raises
`ConfigError` naming the key, the value and what is allowed. Checkpoint metadata and data-iterator state are checked where they are read
(`moegrow.checkpoint`, `moegrow.data.pipeline`).
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from moegrow.config import ModelConfig
from moegrow.data import tokenizer
from moegrow.model import transformer as tf
from moegrow.params.trees import flatten, to_plain
from moegrow.sharding import MESH_AXES, mesh_sizes
from moegrow.surgery import apply as surgery
from moegrow.train import optim

STAGE_KEYS = ("name", "steps", "ops", "mixture", "frozen", "freeze_old_experts", "replay", "ewc", "distill", "lora")
# Continual-learning stage options (growth stages only), with their defaults.
CONTINUAL = {
    # A fraction of rows replayed from the previous stage's mixture, warmed in over warmin_steps.
    "replay": {"fraction": 0.0, "warmin_steps": 0},
    # EWC: Fisher on `batches` x `batch_size` rows of the previous stage's data at its end;
    # gamma: online EWC's decay of the earlier Fisher (None: only the newest one).
    "ewc": {"weight": 0.0, "batches": 4, "batch_size": 8, "labels": "data", "gamma": None},
    # Distillation from the previous stage's final model (the teacher).
    "distill": {"weight": 0.5, "temperature": 1.0, "replay_only": False},
}
# Keys renamed in 0.6.0 (one meaning per name): a config that still uses the old key is refused with
# the new one. {option: {old key: new key}}.
RENAMED = {
    "replay": {"ramp_steps": "warmin_steps"},  # "ramp" is ramped growth (MSG); this is replay's warm-in
    "ewc": {"lam": "weight"},  # `lam` is also a merge method's scale
    "distill": {"alpha": "weight"},  # `alpha` is also LoRA's scale
    "lora": {"alpha": "lora_alpha"},
}


ON_CORRUPT = ("stop", "previous")  # train.on_corrupt_checkpoint


class ConfigError(ValueError):
  """A config field with a bad value: the message names the key, the value and what is allowed."""

  def __init__(self, key: str, value: Any, allowed: str):
    self.key = key
    super().__init__(f"config: {key}={value!r} is not allowed: {allowed}")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _int(tree, key: str, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
  v = _get(tree, key)
  ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
  if not ok:
    rng = what or ("an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else ""))
    raise ConfigError(key, v, rng)
  return int(v)


def _num(tree, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False) -> float:
  v = _get(tree, key)
  ok = _is_num(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
  if not ok:
    lo_s = "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
    hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
    raise ConfigError(key, v, f"a finite number{lo_s}{hi_s}")
  return float(v)


def _get(tree, key: str):
  node = tree
  for part in key.split("."):
    if not hasattr(node, "get") or part not in node:
      raise ConfigError(key, None, "this key is required")
    node = node[part]
  return node


def model_config(config) -> ModelConfig:
  """The config's ModelConfig, with its errors named as `model.<field>`."""
  try:
    return ModelConfig.from_dict(to_plain(config.model, sequences=False))
  except (TypeError, ValueError) as e:
    fields = ModelConfig.defaults()
    named = [w for w in re.findall(r"[a-z_]+", str(e)) if w in fields]  # the first field the error names
    key = f"model.{named[0]}" if named else "model"
    raise ConfigError(key, config.model.get(named[0]) if named else None, str(e)) from e


def _mixture(tree, key: str) -> dict[str, float]:
  mix = _get(tree, key)
  if not hasattr(mix, "items") or not len(mix):
    raise ConfigError(key, mix, "a non-empty {dataset name: weight} dict")
  for name, w in mix.items():
    if not _is_num(w) or w < 0:
      raise ConfigError(f"{key}.{name}", w, "a finite weight >= 0")
  if sum(float(w) for w in mix.values()) <= 0:
    raise ConfigError(key, dict(mix), "weights summing to more than 0")
  return {str(k): float(v) for k, v in mix.items()}


LORA_KEYS = ("rank", "lora_alpha", "targets", "dropout")
BASE_FROZEN = r"^(?!lora/)"  # every parameter but the adapters


def lora_stage(spec, cfg: ModelConfig, ops: tuple, frozen: tuple, i: int) -> tuple[tuple, tuple]:
  """A stage's `lora=dict(rank, lora_alpha, targets, dropout=0.0)`: add_lora after the stage's ops (unless
  the model already carries adapters, which then train on), and the base frozen (no optimizer
  state). Dropout on the adapter path is refused (see the error)."""
  spec = to_plain(spec)
  if isinstance(spec, dict):
    _refuse_renamed("lora", spec, f"stages[{i}].lora")
  unknown = sorted(set(spec) - set(LORA_KEYS)) if isinstance(spec, dict) else None
  spec = dict(spec) if isinstance(spec, dict) else spec
  if unknown is None or unknown or (not cfg.lora_rank and "rank" not in spec):
    raise ValueError(f"stages[{i}].lora={spec!r}: expected dict(rank=, lora_alpha=, targets=) with keys among "
                     f"{LORA_KEYS}" + (f" (unknown: {unknown})" if unknown else ""))
  dropout = spec.pop("dropout", 0.0)
  if dropout:
    raise ValueError(f"stages[{i}].lora.dropout={dropout}: LoRA dropout is not supported. The adapters are folded "
                     "into the weights before the layers run (so the fused expert kernels stay unchanged), which "
                     "leaves no separate x A B path to drop; use dropout=0.0")
  if not cfg.lora_rank:
    ops = ops + (dict(op="add_lora", **spec),)
  elif any(spec.get(k, v) != v for k, v in (("rank", cfg.lora_rank), ("lora_alpha", cfg.lora_alpha))):
    raise ValueError(f"stages[{i}].lora={spec}: the model already carries adapters of rank {cfg.lora_rank}, "
                     f"lora_alpha {cfg.lora_alpha}; they train on as they are (merge_lora first to start new ones)")
  return ops, frozen + (BASE_FROZEN,)


def validate_config(config, num_devices: int, process_count: int = 1) -> list[ModelConfig]:
  """Check the whole run config; return the model config of every stage. Raises ConfigError."""
  cfg = model_config(config)
  tok_spec, tok = _check_data(config)
  _check_train(config)
  sizes = _check_mesh(config, num_devices)
  _check_batches(config, sizes["data"] * sizes["fsdp"] * sizes["expert"], process_count)
  specs = list(config.get("stages", None) or ())
  cfgs = _check_stages(config, specs, cfg)
  _check_expert_axis(sizes["expert"], specs, cfgs)
  _check_frozen(list(config.train.get("frozen", ()) or ()), "train.frozen", cfgs)
  _check_stage_options(config, specs, cfgs)
  # the tokenizer's ids must all have embedding rows, in every stage's model
  try:
    tokenizer.check_vocab(tok, min(c.vocab_size for c in cfgs))
  except ValueError as e:
    raise ConfigError("data.tokenizer", tok_spec, str(e)) from e
  return cfgs


def _check_data(config) -> tuple[Any, Any]:
  """data.*: sequence length, shards, mixture; load the tokenizer. Returns (its spec, the tokenizer)."""
  _int(config, "data.seq_len", 1)
  _int(config, "data.shards", 0)
  _mixture(config, "data.mixture")
  tok_spec = config.data.get("tokenizer", "bytes")
  try:
    tok = tokenizer.load(tok_spec)
  except ValueError as e:
    raise ConfigError("data.tokenizer", tok_spec,
                      f"'bytes' or a usable tokenizer.json, or a folder holding one ({e})") from e
  return tok_spec, tok


def _check_train(config) -> None:
  """train.*: counts, optimizer numbers and the schedule (the batch sizes against the mesh come later)."""
  for k in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"):
    _int(config, f"train.{k}", 1)
  _int(config, "train.eval_batches", 0, what="an integer >= 1, or 0 (the whole validation split)")
  for k in ("warmup_steps", "eval_every", "stop_after_steps", "stop_at_step"):
    if k in config.train:
      _int(config, f"train.{k}", 0)
  _int(config, "train.seed")
  _num(config, "train.lr", 0, lo_open=True)
  _num(config, "train.min_lr_ratio", 0, 1)
  _num(config, "train.b1", 0, 1, hi_open=True)
  _num(config, "train.b2", 0, 1, hi_open=True)
  _num(config, "train.weight_decay", 0)
  _num(config, "train.grad_clip", 0)
  if config.train.get("on_corrupt_checkpoint", "stop") not in ON_CORRUPT:
    raise ConfigError("train.on_corrupt_checkpoint", config.train.on_corrupt_checkpoint, f"one of {ON_CORRUPT}")
  if config.train.schedule not in optim.SCHEDULES:
    raise ConfigError("train.schedule", config.train.schedule, f"one of {optim.SCHEDULES}")


def _check_mesh(config, num_devices: int) -> dict[str, int]:
  """mesh.*: every axis an int, at most one -1, the product equal to the devices used.
  Returns the axis sizes (-1 resolved)."""
  sizes = {}
  for a in MESH_AXES:
    v = _get(config, f"mesh.{a}")
    if not _is_int(v) or (v < 1 and v != -1):
      raise ConfigError(f"mesh.{a}", v, "an integer >= 1, or -1 (the rest of the devices)")
    sizes[a] = int(v)
  devices = int(config.mesh.get("num_devices", 0) or num_devices)
  if not 1 <= devices <= num_devices:
    raise ConfigError("mesh.num_devices", config.mesh.get("num_devices"), f"0 (all) or 1..{num_devices}")
  try:
    sizes = dict(zip(MESH_AXES, mesh_sizes(sizes, devices)))
  except ValueError as e:
    raise ConfigError("mesh", sizes, f"at most one -1 and axis sizes dividing the {devices} devices ({e})") from e
  if math.prod(sizes.values()) != devices:
    raise ConfigError("mesh", sizes, f"axis sizes whose product is the {devices} devices used "
                      f"(set mesh.num_devices to use fewer than the {num_devices} present)")
  return sizes


def _check_expert_axis(expert: int, specs: list, cfgs: list[ModelConfig]) -> None:
  """With an expert axis, every MoE layer of every stage splits its experts evenly over it (a stage
  that prunes 8 experts to 4 on mesh.expert=8 is refused here, before anything trains)."""
  if expert <= 1:
    return
  for i, c in enumerate(cfgs):
    odd = {layer: c.experts_in_layer(layer) for layer in c.moe_layer_ids if c.experts_in_layer(layer) % expert}
    if odd:
      layer, e = next(iter(odd.items()))
      key = "model" if i == 0 else f"stages[{i}]"
      name = specs[i].get("name", i) if i < len(specs) else i
      raise ConfigError(key, f"stage {name}: layer {layer} has {e} experts",
                        f"expert counts that mesh.expert={expert} divides (each chip holds E / {expert} experts); "
                        f"set mesh.expert to a divisor of {e}")


def _check_batches(config, data_parallel: int, process_count: int) -> None:
  """train.batch_size, eval_batch_size and microbatches split evenly over the data-parallel devices."""
  for k in ("batch_size", "eval_batch_size"):
    b = int(config.train[k])
    if b % data_parallel or b % process_count:
      raise ConfigError(f"train.{k}", b, f"a multiple of the data-parallel size {data_parallel} "
                        f"(mesh data x fsdp x expert) and of the {process_count} processes")
  mb = config.train.get("microbatches", 1)
  if not (isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1
          and int(config.train.batch_size) % (mb * data_parallel) == 0):
    raise ConfigError("train.microbatches", mb, f"an integer >= 1 such that batch_size={config.train.batch_size} "
                      f"is a multiple of microbatches x the data-parallel size {data_parallel}")


def _check_stages(config, specs: list, cfg: ModelConfig) -> list[ModelConfig]:
  """stages: lengths, mixtures, ops (their declared config changes). Returns every stage's model
  config (just `cfg` without stages, when train.steps sets the length)."""
  if not specs:
    _int(config, "train.steps", 1)
    return [cfg]
  cfgs, total = [], 0
  for i, spec in enumerate(specs):
    spec = to_plain(spec)
    cfg = _check_stage(spec, i, cfg)
    total += int(spec["steps"])
    cfgs.append(cfg)
  steps = config.train.get("steps")
  if steps not in (None, 0, total):
    raise ConfigError("train.steps", steps, f"the stages' total {total} (with stages the length comes from "
                      "them; set train.steps to that total or to 0)")
  return cfgs


def _check_stage(spec: dict, i: int, cfg: ModelConfig) -> ModelConfig:
  """One stage's keys, steps, mixture and ops; returns its model config (`cfg` grown by the ops)."""
  key = f"stages[{i}]"
  unknown = sorted(set(spec) - set(STAGE_KEYS))
  if unknown:
    raise ConfigError(key, sorted(spec), f"keys among {', '.join(STAGE_KEYS)} (unknown: {unknown})")
  if not (_is_int(spec.get("steps")) and spec["steps"] >= 1):
    raise ConfigError(f"{key}.steps", spec.get("steps"), "an integer >= 1")
  if spec.get("mixture"):
    _mixture({key: spec}, f"{key}.mixture")
  ops = spec.get("ops") or []
  if i == 0 and (ops or spec.get("lora")):
    raise ConfigError(f"{key}.ops", ops, "none in stage 0 (it trains the initial model), nor lora")
  try:
    if spec.get("lora"):
      ops, _ = lora_stage(spec["lora"], surgery.grown_config(cfg, ops), tuple(ops), (), i)
    return surgery.grown_config(cfg, ops)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{key}.ops", ops, str(e)) from e


def _check_stage_options(config, specs: list, cfgs: list[ModelConfig]) -> None:
  """Each stage's frozen entries (with freeze_old_experts' slices), each matching at least one
  parameter, and its replay / ewc / distill options."""
  for i, spec in enumerate(specs):
    spec = to_plain(spec)
    entries = list(spec.get("frozen", ()) or ())
    if spec.get("freeze_old_experts"):
      entries += _old_expert_entries(spec, i, cfgs)
    _check_frozen(entries, f"stages[{i}].frozen", cfgs[i:i + 1])
    opts = continual_options(spec, i)
    shards = int(config.data.get("shards", 0) or 0)
    if opts["ewc"] and shards and opts["ewc"]["batch_size"] % shards:
      raise ConfigError(f"stages[{i}].ewc.batch_size", opts["ewc"]["batch_size"],
                        f"a multiple of data.shards={shards} (the Fisher reads whole global batches)")


def _old_expert_entries(spec: dict, i: int, cfgs: list[ModelConfig]) -> list:
  """freeze_old_experts of growth stage i: the slice entries freezing the experts stage i-1 had."""
  if i == 0:
    raise ConfigError(f"stages[{i}].freeze_old_experts", True, "only in a growth stage (i >= 1)")
  try:
    return list(optim.old_expert_slices(cfgs[i - 1], spec.get("ops") or []))
  except ValueError as e:
    raise ConfigError(f"stages[{i}].freeze_old_experts", True, str(e)) from e


def _check_frozen(entries: list, key: str, cfgs: list[ModelConfig]) -> None:
  """Whole-leaf regexes and slice entries {path, axis, start, stop, lr_scale}: each must be valid
  and match at least one parameter of the given stage configs (a typo freezes nothing)."""
  if not entries:
    return
  params = [tf.abstract_params(c) for c in cfgs]
  paths = sorted(set().union(*(flatten(p) for p in params)))
  for n, e in enumerate(entries):
    k = f"{key}[{n}]"
    pat = e if isinstance(e, str) else (to_plain(e).get("path") if hasattr(e, "items") else None)
    if not isinstance(pat, str):
      raise ConfigError(k, e, "a regex over parameter paths, or {'path': regex, 'axis', 'start', 'stop', "
                        "'lr_scale'}")
    try:
      rx = re.compile(pat)
    except re.error as err:
      raise ConfigError(k, pat, f"a regular expression ({err})") from err
    if not any(rx.search(p) for p in paths):
      raise ConfigError(k, pat, f"a regex matching at least one parameter path, e.g. {paths[:3]}")
    if isinstance(e, str):
      continue
    e = to_plain(e)
    unknown = sorted(set(e) - {"path", "axis", "start", "stop", "lr_scale"})
    if unknown:
      raise ConfigError(k, e, f"keys among path, axis, start, stop, lr_scale (unknown: {unknown})")
    for f in ("axis", "start", "stop"):
      if f in e and not _is_int(e[f]):
        raise ConfigError(f"{k}.{f}", e[f], "an integer")
    if not _is_num(e.get("lr_scale", 0.0)) or e.get("lr_scale", 0.0) < 0:
      raise ConfigError(f"{k}.lr_scale", e.get("lr_scale"), "a finite number >= 0 (0 = frozen)")
    for p in params:
      try:
        optim.slice_scales(p, [e])
      except ValueError as err:
        raise ConfigError(k, e, str(err).split(": ", 1)[-1]) from err


def _refuse_renamed(option: str, given: dict, key: str) -> None:
  """ConfigError for a key renamed in 0.6.0, naming the new key."""
  for old, new in RENAMED.get(option, {}).items():
    if old in given:
      raise ConfigError(f"{key}.{old}", given[old], f"the same setting under its new name, {key}.{new} "
                        f"(renamed in moegrow 0.6.0)")


def continual_options(spec: dict, i: int) -> dict[str, dict | None]:
  """A stage spec's replay / ewc / distill options, each filled with its defaults (None: off).
  ConfigError naming `stages[i].<option>.<field>` for anything out of range."""
  out = {}
  for name, defaults in CONTINUAL.items():
    given = spec.get(name)
    key = f"stages[{i}].{name}"
    if given is None or given is False:
      out[name] = None
      continue
    if i == 0:
      raise ConfigError(key, given, "only in a growth stage (i >= 1): stage 0 has no earlier model or data")
    if name == "replay" and _is_num(given):
      given = {"fraction": given}
    if not hasattr(given, "items"):
      raise ConfigError(key, given, f"a dict with keys among {sorted(defaults)}")
    given = to_plain(given)
    _refuse_renamed(name, given, key)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ConfigError(key, given, f"keys among {sorted(defaults)} (unknown: {unknown})")
    opt = dict(defaults, **given)
    _OPTION_CHECKS[name](opt, key)
    out[name] = opt
  if out["distill"] and out["distill"]["replay_only"] and not (out["replay"] and out["replay"]["fraction"] > 0):
    raise ConfigError(f"stages[{i}].distill.replay_only", True, "a stage with replay.fraction > 0 (no row "
                      "would be distilled)")
  return out


def _check_replay(opt: dict, key: str) -> None:
  """replay: fraction in [0, 1], warmin_steps >= 0."""
  if not (_is_num(opt["fraction"]) and 0 <= opt["fraction"] <= 1):
    raise ConfigError(f"{key}.fraction", opt["fraction"], "a number in [0, 1]")
  if not (_is_int(opt["warmin_steps"]) and opt["warmin_steps"] >= 0):
    raise ConfigError(f"{key}.warmin_steps", opt["warmin_steps"], "an integer >= 0")


def _check_ewc(opt: dict, key: str) -> None:
  """ewc: weight > 0, batches and batch_size >= 1, labels, gamma."""
  if not (_is_num(opt["weight"]) and opt["weight"] > 0):
    raise ConfigError(f"{key}.weight", opt["weight"], "a finite number > 0 (the penalty's weight)")
  for f in ("batches", "batch_size"):
    if not (_is_int(opt[f]) and opt[f] >= 1):
      raise ConfigError(f"{key}.{f}", opt[f], "an integer >= 1")
  if opt["labels"] not in ("data", "model"):
    raise ConfigError(f"{key}.labels", opt["labels"], "'data' (empirical Fisher) or 'model' (sampled labels)")
  if opt["gamma"] is not None and not (_is_num(opt["gamma"]) and 0 <= opt["gamma"] <= 1):
    raise ConfigError(f"{key}.gamma", opt["gamma"], "None (offline EWC) or a number in [0, 1] (online EWC)")


def _check_distill(opt: dict, key: str) -> None:
  """distill: weight in (0, 1], temperature > 0, replay_only a bool."""
  if not (_is_num(opt["weight"]) and 0 < opt["weight"] <= 1):
    raise ConfigError(f"{key}.weight", opt["weight"], "a number in (0, 1] (the distillation term's weight)")
  if not (_is_num(opt["temperature"]) and opt["temperature"] > 0):
    raise ConfigError(f"{key}.temperature", opt["temperature"], "a finite number > 0")
  if not isinstance(opt["replay_only"], bool):
    raise ConfigError(f"{key}.replay_only", opt["replay_only"], "True or False")


# The range checks of each continual option (filled with its defaults), keyed as CONTINUAL.
_OPTION_CHECKS = {"replay": _check_replay, "ewc": _check_ewc, "distill": _check_distill}
