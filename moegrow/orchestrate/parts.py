"""A run's plan: the stages a config resolves to, and what each stage is built from.

`resolve_stages` turns `config.stages` into `Stage`s (model config per stage from the ops'
declared config changes, no arrays); the rest builds a stage's pieces from the config: its train
config (frozen entries), data (mixture and replay), objective (EWC, distillation), checkpoint
manager, mesh, evaluation sets and training iterator. Pure bookkeeping: nothing here trains or
grows (`moegrow.orchestrate.boundary` grows, `moegrow.orchestrate.stages` runs).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moegrow import checkpoint, data, sharding
from moegrow.config import ModelConfig
from moegrow.orchestrate.validate import BASE_FROZEN, STAGE_KEYS, continual_options, lora_stage
from moegrow.params.trees import to_plain
from moegrow.surgery import apply as surgery
from moegrow.train import optim
from moegrow.train.steps import Objective


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run: steps [start, end) of one schedule, the model `cfg` trained in it, and
  what the boundary into it does (growth `ops`) and what its training adds (frozen slices,
  replay, EWC, distillation)."""
  index: int
  name: str
  start: int  # global step at which the stage begins
  end: int  # global step at which it ends
  ops: tuple  # growth ops applied at `start` (empty for stage 0)
  mixture: dict | None  # None: the config's data.mixture
  cfg: ModelConfig  # the model trained in this stage
  frozen: tuple = ()  # entries added to train.frozen in this stage (see optim.make_optimizer)
  replay: dict | None = None  # {'fraction', 'warmin_steps'}: rows from the previous stage's mixture
  ewc: dict | None = None  # {'lam', 'batches', 'batch_size', 'labels', 'gamma'}
  distill: dict | None = None  # {'weight', 'temperature', 'replay_only'}: the previous model teaches


def stage_train(tr, stage: Stage):
  """The train config of `stage`: `tr` with the stage's frozen entries appended."""
  if not stage.frozen:
    return tr
  out = ml_collections.ConfigDict(tr.to_dict())
  out.frozen = tuple(tr.get("frozen", ()) or ()) + tuple(stage.frozen)
  return out


def resolve_stages(config, base_cfg: ModelConfig) -> list[Stage]:
  """Stages from `config.stages` (or one stage of `config.train.steps` if there are none).
  Each stage's model config comes from its ops' declared config changes (no arrays)."""
  specs = list(config.get("stages", None) or ())
  if not specs:
    return [Stage(0, "train", 0, int(config.train.steps), (), None, base_cfg)]
  stages, start, cfg = [], 0, base_cfg
  for i, spec in enumerate(specs):
    prev = cfg
    spec = to_plain(spec)
    unknown = sorted(set(spec) - set(STAGE_KEYS))
    if unknown:
      raise ValueError(f"stages[{i}]: unknown keys {unknown} (expected {', '.join(STAGE_KEYS)})")
    ops = tuple(spec.get("ops", ()) or ())
    if i == 0 and (ops or spec.get("lora")):
      raise ValueError("stages[0] trains the initial model and cannot have growth ops or LoRA adapters")
    frozen = tuple(spec.get("frozen", ()) or ())
    if spec.get("lora"):  # LoRA: adapters (added unless the model has them) train, the base is frozen
      ops, frozen = lora_stage(spec["lora"], surgery.grown_config(cfg, ops), ops, frozen, i)
    cfg = surgery.grown_config(cfg, ops)
    steps = int(spec["steps"])
    mixture = spec["mixture"] if spec.get("mixture") else None
    if spec.get("freeze_old_experts"):
      frozen += optim.old_expert_slices(prev, ops)
    extra = continual_options(spec, i)
    stages.append(Stage(i, str(spec.get("name", f"stage{i}")), start, start + steps, ops, mixture, cfg, frozen,
                        **extra))
    start += steps
  return stages


def stage_data(config, stages: list[Stage]) -> list[tuple[dict, data.Replay | None]]:
  """Each stage's (mixture, replay). Replay draws from the previous stage's data as it stood at
  that stage's end: its mixture with its own replay at full fraction."""
  out, prev = [], None
  for st in stages:
    mixture = dict(st.mixture or config.data.mixture)
    replay = None
    if st.replay and st.replay["fraction"] > 0:
      replay = data.Replay(prev, st.replay["fraction"], st.replay["warmin_steps"])
    norm = {n: w / sum(mixture.values()) for n, w in mixture.items()}
    if replay is None:
      prev = {n: w for n, w in norm.items() if w > 0}
    else:
      f = replay.fraction
      merged = {n: (1 - f) * w for n, w in norm.items()}
      for n, w in replay.mixture.items():
        merged[n] = merged.get(n, 0.0) + f * w
      prev = {n: w for n, w in merged.items() if w > 0}
    out.append((mixture, replay))
  return out


def teacher(stage: Stage, stages: list[Stage]) -> ModelConfig | None:
  """The model a distilling stage runs forward on every batch (the previous stage's; None when the
  stage does not distil, or with weight 0): what its FLOPs count besides its own training step."""
  if stage.distill and float(stage.distill.get("weight", 0) or 0) > 0 and stage.index > 0:
    return stages[stage.index - 1].cfg
  return None


def objective(stage: Stage, stages: list[Stage]) -> Objective | None:
  """The stage's loss terms against forgetting (None: plain LM loss)."""
  if not (stage.ewc or stage.distill):
    return None
  d = stage.distill or {}
  return Objective(ewc_weight=float(stage.ewc["weight"]) if stage.ewc else 0.0,
                   distill_weight=float(d.get("weight", 0.0)), temperature=float(d.get("temperature", 1.0)),
                   distill_replay_only=bool(d.get("replay_only", False)),
                   teacher_cfg=stages[stage.index - 1].cfg if d else None)


def checkpoint_meta(stage: Stage, lineage: list, step: int, ops=()) -> dict:
  """Checkpoint metadata: the model config, the stage, and the lineage (every stage and op
  that produced the checkpoint) extended by this stage's entry."""
  entry = {"stage": stage.index, "name": stage.name, "step": int(step), "ops": to_plain(list(ops))}
  return {"model": stage.cfg.to_dict(), "stage": stage.index, "lineage": list(lineage) + [entry]}


def growth_key(seed: int, stage: int):
  """The random key of the growth into `stage` (new weights' init): fixed by seed and stage."""
  return jax.random.fold_in(jax.random.key(seed), 1000 + stage)


def adapter_stage(stage: Stage) -> bool:
  """A LoRA stage: adapters train on a frozen base, so its checkpoints after the first (the base)
  hold only the adapters' state (moegrow.checkpoint, "Adapter checkpoints")."""
  return bool(stage.cfg.lora_rank) and BASE_FROZEN in stage.frozen


def config_diff(a: ModelConfig, b: ModelConfig) -> str:
  """The fields where `a` differs from `b` (the config's), for error messages."""
  da, db = a.to_dict(), b.to_dict()
  return ", ".join(f"{k}={da[k]!r} (config: {db[k]!r})" for k in da if da[k] != db[k]) or "no difference"


# ---------------------------------------------------------------- from a config

def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict())


def make_mesh(config) -> Mesh:
  """The config's mesh over all devices, or the first `mesh.num_devices` of them."""
  return make_mesh_from(config, jax.devices())


def make_mesh_from(config, devices) -> Mesh:
  """The config's mesh over `devices` (e.g. a TPU slice's abstract devices, moegrow.aot), or the
  first `mesh.num_devices` of them."""
  n = int(config.mesh.get("num_devices", 0) or 0)
  return sharding.make_mesh(dict(config.mesh), devices=list(devices)[:n] if n else list(devices))


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir or os.path.join("~", "tensorflow_datasets"))


def eval_sets(config, names=None) -> dict[str, list[dict]]:
  """{domain: validation batches}: train.eval_batches of them, or (0) every full batch of the split."""
  dd, tr = data_dir(config), config.train
  names = names or [n for n, w in config.data.mixture.items() if w > 0]
  return {data.domain_name(n): data.eval_batches(n, seq_len=config.data.seq_len, batch_size=tr.eval_batch_size,
                                                 num_batches=tr.eval_batches or 2**40, data_dir=dd,
                                                 text_key=config.data.text_key,
                                                 tokenizer=config.data.get("tokenizer", "bytes")) for n in names}


def train_iter(config, mixture=None, replay: data.Replay | None = None, *, seed_offset: int = 0,
               whole: bool = False, batch_size: int | None = None) -> data.ShardedIterator:
  """This process's rows of the global batches: its own `data.shards` (0: one per process).
  `whole`: every shard on this process (the global batch, e.g. for a probe every process runs
  alike); `seed_offset` gives another stream of the same data."""
  dd = data_dir(config)  # local corpora are built there on first use
  procs = (0, 1) if whole else (jax.process_index(), jax.process_count())
  return data.make_sharded_train_iter(dict(mixture or config.data.mixture), seq_len=config.data.seq_len,
                                      global_batch=batch_size or config.train.batch_size,
                                      seed=config.train.seed + seed_offset, data_dir=dd,
                                      num_shards=config.data.get("shards", 0) or (1 if whole else 0),
                                      process_index=procs[0], process_count=procs[1],
                                      text_key=config.data.text_key, replay=replay,
                                      tokenizer=config.data.get("tokenizer", "bytes"),
                                      vocab_size=config.model.vocab_size)


def manager(workdir: str, stage: int, tr, read_only: bool = False, pinned: tuple = ()):
  return checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=tr.keep_checkpoints,
                            async_save=tr.async_checkpoint, read_only=read_only,
                            step_prefix=checkpoint.stage_prefix(stage), pinned=pinned)


def latest(workdir: str, stages: list[Stage], tr) -> tuple[int, int | None]:
  """(stage index, step) of the newest checkpoint in `workdir`, or (-1, None)."""
  for st in reversed(stages):
    m = manager(workdir, st.index, tr, read_only=True)
    step = m.latest_step() if os.path.isdir(m.directory) else None
    m.close()
    if step is not None:
      return st.index, step
  return -1, None


def state_bytes(abstract_state) -> str:
  """'params X MiB, optimizer state Y MiB' of a train state (LoRA: the frozen base has none)."""
  size = lambda t: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(t))
  return (f"params {size(abstract_state['params']) / 2**20:.2f} MiB, "
          f"optimizer state {size(abstract_state['opt_state']) / 2**20:.2f} MiB")
