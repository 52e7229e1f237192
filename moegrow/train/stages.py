"""Stages: a run is a list of stages; growth happens at their boundaries (the orchestrator).

A config may hold `stages`: stage 0 trains; each later stage names its growth `ops` (see
`moegrow.surgery.apply.OPS`; none = continue the same model, e.g. on new data), its `steps`, and
optionally a new data `mixture`. Stage i's
checkpoints live in `<workdir>/checkpoints/` under `checkpoint.step_name(i, step)`, so the final
checkpoint of a stage and the first (grown) checkpoint of the next share a step number without
sharing a directory. At a boundary (docs/growth.md):
  1. the finished stage's final checkpoint is on disk;
  2. it is restored at its OWN shapes (from its stored model config) on the current mesh;
  3. the ops run under `jax.jit(..., out_shardings=<new shardings>)` on params and Adam moments;
  4. the result is checked against the new stage's abstract tree, the held-out loss per domain is
     measured before and after (the growth certificate, `<workdir>/growth/<step>.json`), and the
     grown state is saved as the new stage's first checkpoint (lineage in its metadata).
The source checkpoint is never written to; a crash before step 4 completes leaves the source
as the latest checkpoint, so a restart simply grows again.

Continual learning (growth stages; README "Continual pre-training"): `replay` mixes in the
previous stage's data, `ewc` measures the diagonal Fisher of the finished stage at the boundary
and penalises moving away from its params (the Fisher is remapped through growth and saved as the
checkpoint item `ewc`), `distill` uses the previous stage's final model as a frozen teacher in the
same jitted step, `freeze_old_experts` / `frozen` freeze slices. At a stage's end the forgetting
report (`moegrow.train.forgetting`) measures loss change per domain and routing drift.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moegrow import checkpoint, data, sharding
from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.surgery import apply as surgery
from moegrow.train import continual, forgetting, loop, optim, probes
from moegrow.train.logbook import Logbook
from moegrow.train.steps import Objective, build_program, params_sharding
from moegrow.train.validate import BASE_FROZEN, STAGE_KEYS, continual_options, lora_stage, validate_config
from moegrow.trees import to_plain
from moegrow.workdir_lock import WorkdirLock



@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  name: str
  start: int  # global step at which the stage begins
  end: int  # global step at which it ends
  ops: tuple  # growth ops applied at `start` (empty for stage 0)
  mixture: dict | None  # None: the config's data.mixture
  cfg: ModelConfig  # the model trained in this stage
  frozen: tuple = ()  # entries added to train.frozen in this stage (see optim.make_optimizer)
  replay: dict | None = None  # {'fraction', 'ramp_steps'}: rows from the previous stage's mixture
  ewc: dict | None = None  # {'lam', 'batches', 'batch_size', 'labels', 'gamma'}
  distill: dict | None = None  # {'alpha', 'temperature', 'replay_only'}: the previous model teaches


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
      replay = data.Replay(prev, st.replay["fraction"], st.replay["ramp_steps"])
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


def objective(stage: Stage, stages: list[Stage]) -> Objective | None:
  """The stage's loss terms against forgetting (None: plain LM loss)."""
  if not (stage.ewc or stage.distill):
    return None
  d = stage.distill or {}
  return Objective(ewc_lambda=float(stage.ewc["lam"]) if stage.ewc else 0.0,
                   distill_alpha=float(d.get("alpha", 0.0)), temperature=float(d.get("temperature", 1.0)),
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


def manager(workdir: str, stage: int, tr, read_only: bool = False, pinned: tuple = ()):
  return checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=tr.keep_checkpoints,
                            async_save=tr.async_checkpoint, read_only=read_only,
                            step_prefix=checkpoint.stage_prefix(stage), pinned=pinned)


def adapter_stage(stage: Stage) -> bool:
  """A LoRA stage: adapters train on a frozen base, so its checkpoints after the first (the base)
  hold only the adapters' state (moegrow.checkpoint, "Adapter checkpoints")."""
  return bool(stage.cfg.lora_rank) and BASE_FROZEN in stage.frozen


def latest(workdir: str, stages: list[Stage], tr) -> tuple[int, int | None]:
  """(stage index, step) of the newest checkpoint in `workdir`, or (-1, None)."""
  for st in reversed(stages):
    m = manager(workdir, st.index, tr, read_only=True)
    step = m.latest_step() if os.path.isdir(m.directory) else None
    m.close()
    if step is not None:
      return st.index, step
  return -1, None


# ---------------------------------------------------------------- from a config

def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict())


def make_mesh(config) -> Mesh:
  """The config's mesh over all devices, or the first `mesh.num_devices` of them."""
  n = int(config.mesh.get("num_devices", 0) or 0)
  return sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:n] if n else None)


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



# ---------------------------------------------------------------- growth at a boundary

def state_bytes(abstract_state) -> str:
  """'params X MiB, optimizer state Y MiB' of a train state (LoRA: the frozen base has none)."""
  size = lambda t: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(t))
  return (f"params {size(abstract_state['params']) / 2**20:.2f} MiB, "
          f"optimizer state {size(abstract_state['opt_state']) / 2**20:.2f} MiB")


def own_buffers(state):
  """`state` with one buffer per leaf: leaves sharing a buffer with an earlier leaf are copied.
  Growth may return one array for several leaves (e.g. identical zero moments); the train step
  donates its state and XLA cannot donate a buffer twice."""
  seen: set = set()

  def own(x):
    ptrs = tuple(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)
    if ptrs in seen:
      return jnp.array(x, copy=True)
    seen.add(ptrs)
    return x
  return jax.tree_util.tree_map(own, state)


def _certificate_rows(held: dict, mesh) -> dict:
  """The certificate needs only a few sequences per domain: keep max(4, batch shards) rows."""
  shards = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh)] or [1]))
  rows = max(4, shards)
  return {d: [{k: v[:rows] for k, v in b.items() if isinstance(v, np.ndarray)} for b in bs]
          for d, bs in held.items()}


def _needs_loads(o: dict) -> bool:
  """add_experts(source='most_loaded') and to_dense(mode='concat_topk') without `loads`."""
  if o.get("loads"):
    return False
  return ((o.get("op") == "add_experts" and o.get("source") == "most_loaded")
          or (o.get("op") == "to_dense" and o.get("mode", "concat_topk") == "concat_topk"))


def _needs_centroids(o: dict) -> bool:
  """add_experts(router_init='hidden') without `centroids`."""
  return o.get("op") == "add_experts" and o.get("router_init") == "hidden" and not o.get("centroids")


def _with_loads(ops: list[dict], measure, measure_means=None) -> list[dict]:
  """Ops with the data they need measured: add_experts(source='most_loaded') and
  to_dense(mode='concat_topk') get `loads` (`measure()`); add_experts(router_init='hidden') gets
  `centroids` {layer: [mean MLP input of the other domains, of router_domain]} from
  `measure_means()` ({layer: {domain: mean}}, `probes.mlp_input_means` of the old model)."""
  out = [dict(o) for o in ops]
  if any(_needs_loads(o) for o in out):
    loads = measure()
    for o in out:
      if _needs_loads(o):
        o["loads"] = loads
  if any(_needs_centroids(o) for o in out):
    means = measure_means()
    for o in out:
      if not _needs_centroids(o):
        continue
      new = o.get("router_domain", "")
      domains = sorted({d for per in means.values() for d in per})
      if new not in domains or len(domains) < 2:
        raise ValueError(f"add_experts(router_init='hidden'): router_domain={new!r} needs validation data of it "
                         f"and of at least one other domain at this boundary; domains here: {domains}")
      o["centroids"] = {i: np.stack([np.mean([per[d] for d in per if d != new], axis=0), per[new]]).tolist()
                        for i, per in means.items()}
  return out


def grow_checkpoint(src_mngr, src_step: int, stage: Stage, tr, mesh, held: dict, dst_mngr, workdir: str,
                    key, src_tr=None, fisher_batches=None, evals=None) -> tuple[dict, Any, dict, dict | None]:
  """Restore `src_step` at its own shapes, apply `stage.ops`, save as `stage`'s first checkpoint.

  `held`: {domain: [batch]} for the certificate; `evals` (optional): {domain: [batch]} on which
  the source model's loss is recorded as the reference for forgetting (`eval_before`).
  With `stage.ewc`, `fisher_batches` (global batches of the source stage's data) give the
  source's diagonal Fisher; online EWC adds gamma times the source checkpoint's own Fisher. The
  Fisher goes through the ops' rules (kind 'fisher': new slices 0) and the anchor is the grown
  params (the ops' image of the source's). Returns (grown state, data iterator state of the
  new stage, growth certificate, ewc item or None). Memory: the old state is released before the
  save, and the new optimizer state is built in the same jit as its moments."""
  held = _certificate_rows(held, mesh)
  meta = checkpoint.read_meta(src_mngr, src_step)
  old_cfg = checkpoint.model_config(meta)
  old = build_program(old_cfg, tr if src_tr is None else src_tr, mesh)  # the source stage's optimizer
  state, meta, data_state = checkpoint.restore(src_mngr, src_step, old.abstract_state)
  before = {d: m["loss"] for d, m in probes.domain_losses(old, state["params"], held).items()}
  eval_before = ({d: m["loss"] for d, m in probes.domain_losses(old, state["params"], evals).items()}
                 if evals else None)
  fisher = None
  if stage.ewc:
    fisher = probes.fisher_diagonal(old_cfg, state["params"], fisher_batches, labels=stage.ewc["labels"],
                                    key=jax.random.fold_in(key, 77))
    if stage.ewc["gamma"] is not None and checkpoint.has_item(src_mngr, src_step, checkpoint.EWC):
      earlier = checkpoint.restore_item(src_mngr, src_step, checkpoint.EWC, ewc_abstract(old_cfg, mesh))
      fisher = continual.online_fisher(earlier["fisher"], fisher, float(stage.ewc["gamma"]))  # Schwarz et al. 2018
      del earlier
  params_before = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(state["params"])))
  old_params = state["params"]
  ops = _with_loads(list(stage.ops), lambda: probes.expert_loads(
      old_cfg, old_params, [b for bs in held.values() for b in bs], mesh),
      lambda: probes.mlp_input_means(old_cfg, old_params, evals or held, mesh))
  grown_cfg = surgery.grown_config(old_cfg, ops)
  if grown_cfg != stage.cfg:
    raise ValueError(f"stage {stage.index} ({stage.name}): growing the checkpoint at step {src_step} gives "
                     f"{config_diff(grown_cfg, stage.cfg)}; the checkpoint's model differs from the config's")
  moments = optim.adam_moments(state["opt_state"], state["params"])
  new = build_program(stage.cfg, stage_train(tr, stage), mesh)
  box: dict[str, Any] = {}

  def run(params, mu, nu, count, step, k, fisher):
    out, _, box["reports"] = surgery.apply_ops({"params": params, "mu": mu, "nu": nu}, old_cfg, ops, k,
                                               shapes=tf.abstract_params)
    opt = optim.with_adam_moments(new.tx.init(out["params"]), out["mu"], out["nu"], count)
    grown = {"params": out["params"], "opt_state": opt, "step": step}
    if fisher is None:
      return grown, None
    f = surgery.remap(fisher, old_cfg, ops, k, shapes=tf.abstract_params, kind="fisher")
    f = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), f)
    anchor = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), out["params"])  # theta*: the grown params
    return grown, {"fisher": f, "anchor": anchor}
  p_sh = new.state_sharding["params"]
  ewc_sh = None if fisher is None else {"fisher": p_sh, "anchor": p_sh}
  new_state, ewc = jax.jit(run, out_shardings=(new.state_sharding, ewc_sh))(
      state["params"], moments["mu"], moments["nu"], moments["count"], state["step"], key, fisher)
  del state, moments, fisher  # the old state is no longer needed: free it before the save
  new_state, ewc = own_buffers((new_state, ewc))
  after = {d: m["loss"] for d, m in probes.domain_losses(new, new_state["params"], held).items()}
  new_meta = checkpoint_meta(stage, meta.get("lineage", []), src_step, ops)
  cert = {"step": int(src_step), "stage": stage.index, "name": stage.name,
          "source": checkpoint.step_dir(src_mngr, src_step), "ops": to_plain(ops),
          "loss_before": before, "loss_after": after, "loss_change": {d: after[d] - before[d] for d in before},
          "eval_before": eval_before,
          "params_before": params_before,
          "params_after": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(new_state["params"]))),
          "reports": box["reports"]}
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "growth", f"{int(src_step)}.json"), cert)
  if data_state is not None:  # the new stage's stream: every domain resumes by name, rows from 0
    data_state = data.stage_start(data_state)
  checkpoint.save(dst_mngr, src_step, new_state, new_meta, data_state, ewc=ewc)
  dst_mngr.wait_until_finished()
  return new_state, data_state, cert, ewc


def config_diff(a: ModelConfig, b: ModelConfig) -> str:
  """The fields where `a` differs from `b` (the config's), for error messages."""
  da, db = a.to_dict(), b.to_dict()
  return ", ".join(f"{k}={da[k]!r} (config: {db[k]!r})" for k in da if da[k] != db[k]) or "no difference"


def certificate_text(cert: dict) -> str:
  lines = [f"growth certificate @ step {cert['step']} -> stage {cert['stage']} ({cert['name']}): "
           f"{', '.join(o['op'] for o in cert['ops'])}; params {cert['params_before']:,} -> {cert['params_after']:,}"]
  for d in cert["loss_before"]:
    lines.append(f"  {d:<20} held-out loss {cert['loss_before'][d]:.5f} -> {cert['loss_after'][d]:.5f} "
                 f"(change {cert['loss_change'][d]:+.2e})")
  return "\n".join(lines)


def grow_offline(config, source: str, workdir: str, stage: int | None = None) -> dict:
  """Grow the checkpoint at `source` into stage `stage` of `config` (default: the stage whose
  predecessor's model is the checkpoint's), writing it as that stage's first checkpoint in
  `workdir`; `moegrow.main` with the same config and workdir then trains on from it."""
  src_dir, prefix, step = checkpoint.locate(source)
  src = checkpoint.manager(src_dir, read_only=True, step_prefix=prefix)
  src_cfg = checkpoint.model_config(checkpoint.read_meta(src, step))
  stages = resolve_stages(config, model_config(config))
  if stage is None:
    fits = [s.index for s in stages[1:] if stages[s.index - 1].cfg == src_cfg]
    if not fits:
      raise ValueError(f"checkpoint {checkpoint.step_dir(src, step)}: its model matches no stage of the config "
                       f"(vs stage 0: {config_diff(src_cfg, stages[0].cfg)})")
    stage = fits[0]
  if not 1 <= stage < len(stages):
    raise ValueError(f"--stage={stage}: the config's growth stages are 1..{len(stages) - 1}")
  if stages[stage - 1].cfg != src_cfg:
    raise ValueError(f"checkpoint {checkpoint.step_dir(src, step)} is not the model stage {stage} grows from: "
                     f"{config_diff(src_cfg, stages[stage - 1].cfg)}")
  tr = config.train
  prepare(config, workdir)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0), loop.Preempted() as pre:
    dst = manager(workdir, stage, tr)
    if dst.latest_step() is not None:
      raise ValueError(f"{workdir} already holds stage {stage} checkpoints; use a new --workdir")
    evals = eval_sets(config, [n for n, w in dict(stages[stage].mixture or config.data.mixture).items() if w > 0])
    held = {d: b[:1] for d, b in evals.items()}
    try:
      _, _, cert, _ = grow_checkpoint(src, step, stages[stage], tr, make_mesh(config), held, dst, workdir,
                                      growth_key(tr.seed, stage), src_tr=stage_train(tr, stages[stage - 1]),
                                      fisher_batches=fisher_batches(config, stages, stage))
    finally:
      dst.close()
      src.close()
    cert["preempted"] = pre.flag  # SIGTERM during growth: it finished and saved first
  return cert


def fisher_batches(config, stages: list[Stage], index: int) -> list[dict] | None:
  """EWC's data for the growth into stage `index`: `ewc.batches` global batches of `ewc.batch_size`
  rows of the previous stage's data (its own stream: another seed), the same on every process."""
  st = stages[index]
  if not st.ewc:
    return None
  mixture, replay = stage_data(config, stages)[index - 1]
  it = train_iter(config, mixture, replay, seed_offset=7919, whole=True, batch_size=int(st.ewc["batch_size"]))
  return [next(it) for _ in range(int(st.ewc["batches"]))]


def teacher_params(workdir: str, stages: list[Stage], stage: Stage, tr, mesh):
  """The distillation teacher of `stage`: the previous stage's final params, restored from its
  newest checkpoint at that stage's own shapes on `mesh` (sharded like a student of that model)."""
  prev = stages[stage.index - 1]
  src = manager(workdir, prev.index, tr, read_only=True)
  try:
    step = src.latest_step()
    if step is None or step < prev.end:
      raise ValueError(f"stage {stage.index} ({stage.name}) distils from stage {prev.index}'s final model, but "
                       f"{src.directory} has no checkpoint of stage {prev.index} at step {prev.end} "
                       f"(newest: {step})")
    program = build_program(prev.cfg, stage_train(tr, prev), mesh)
    state, _, _ = checkpoint.restore(src, step, program.abstract_state)
  finally:
    src.close()
  return state["params"]


def ewc_abstract(cfg: ModelConfig, mesh) -> dict:
  """The abstract `ewc` item ({'fisher', 'anchor'}, float32, sharded like the params)."""
  a = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=h),
                             tf.abstract_params(cfg), params_sharding(cfg, mesh))
  return {"fisher": a, "anchor": a}


# ---------------------------------------------------------------- the whole run

def check_workdir(workdir: str) -> None:
  """The workdir can be created and written: OSError naming the path and the free space if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(f"workdir {os.path.abspath(workdir)} is not writable ({e.strerror or e}); "
                  f"{checkpoint.free_bytes(workdir) / 2**30:.2f} GiB free there") from e


def prepare(config, workdir: str) -> None:
  """Everything checked before anything is built: the config, the workdir."""
  validate_config(config, jax.device_count(), jax.process_count())
  if jax.process_index() == 0:
    check_workdir(workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run every stage of `config` (growing at stage boundaries), resuming from `workdir`.

  Load order, in one place: this run's newest checkpoint (whatever its stage) > grow the previous
  stage's final checkpoint (if the newest one ends a stage) > scratch. Returns the final metrics.
  The config is validated first; one process at a time may run in a workdir (a lock file); SIGTERM
  at any point leaves a resumable state (`result['preempted']`).
  """
  prepare(config, workdir)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0), loop.Preempted() as pre:
    return _run_stages(config, workdir, pre)


def _run_stages(config, workdir: str, pre: loop.Preempted) -> dict[str, Any]:
  mesh = make_mesh(config)
  stages = resolve_stages(config, model_config(config))
  tr = ml_collections.ConfigDict(config.train.to_dict())
  tr.steps = stages[-1].end  # one schedule over all stages; the Adam count carries through growth
  book = Logbook(workdir, tr.steps)
  feeds = stage_data(config, stages)
  domains = list(dict.fromkeys(n for m, r in feeds for n in data.domain_order(m, r)
                               if m.get(n, 0) > 0 or (r is not None and r.mixture.get(n, 0) > 0)))
  evals = eval_sets(config, domains)
  held = {d: b[:1] for d, b in evals.items()}
  at_stage, at_step = latest(workdir, stages, tr)
  book.truncate_after(at_step or 0)  # rows past the restored step are replayed: each step once
  budget = tr.get("stop_after_steps", 0) or None  # steps this invocation may train
  stop_at = tr.get("stop_at_step", 0) or None  # global step at which this invocation ends
  result: dict[str, Any] = {"preempted": False}
  for st in stages:
    if st.index < at_stage or (st.index == at_stage and at_step >= st.end and st.index < len(stages) - 1):
      continue  # finished earlier (a finished stage's successor grows from its checkpoint below)
    if pre.flag:  # SIGTERM before this stage started: what is on disk is resumable as it is
      book.say(f"SIGTERM: stopping before stage {st.index}; run the same command to resume")
      result["preempted"] = True
      break
    mngr = manager(workdir, st.index, tr, pinned=(st.start,) if adapter_stage(st) else ())
    ewc = None
    try:
      program = build_program(st.cfg, stage_train(tr, st), mesh, objective(st, stages))
      book.say(f"stage {st.index} ({st.name}): " + state_bytes(program.abstract_state))
      if st.index == at_stage:
        where = checkpoint.step_dir(mngr, at_step)
        stored_cfg = checkpoint.model_config(checkpoint.read_meta(mngr, at_step))  # validated metadata
        if stored_cfg != st.cfg:
          raise ValueError(f"checkpoint {where} holds a different model than stage {st.index} of the config: "
                           f"{config_diff(stored_cfg, st.cfg)}")
        state, meta, data_state = checkpoint.restore(mngr, at_step, program.abstract_state)
        if st.ewc:
          ewc = checkpoint.restore_item(mngr, at_step, checkpoint.EWC, ewc_abstract(st.cfg, mesh))
        book.say(f"resumed from {where} at step {at_step} (stage {st.index}: {st.name})")
      elif st.index == 0:
        state, data_state, where = program.init(jax.random.key(tr.seed)), None, "init"
        meta = checkpoint_meta(st, [], step=0)
      else:
        src = manager(workdir, st.index - 1, tr, read_only=True)
        book.say(f"growing {checkpoint.step_dir(src, src.latest_step())} into stage {st.index} ({st.name}): "
                 f"{', '.join(o['op'] for o in st.ops) or 'no ops (same model)'}")
        state, data_state, cert, ewc = grow_checkpoint(
            src, src.latest_step(), st, tr, mesh, held, mngr, workdir, growth_key(tr.seed, st.index),
            src_tr=stage_train(tr, stages[st.index - 1]), fisher_batches=fisher_batches(config, stages, st.index),
            evals=evals)
        src.close()
        book.say(certificate_text(cert))
        where = checkpoint.step_dir(mngr, int(state["step"]))
        meta = checkpoint.read_meta(mngr, int(state["step"]))
        result.setdefault("certificates", []).append(cert)
        if pre.flag:  # SIGTERM during growth: the grown checkpoint is saved; stop here
          book.say(f"SIGTERM during growth: the grown checkpoint {where} is saved; exiting. Run the same command "
                   "to resume")
          result.update(preempted=True, step=int(state["step"]), stage=st.index)
          break
      if adapter_stage(st) and "adapters" not in meta:  # the stage's first checkpoint is the adapters' base
        meta = checkpoint.with_adapters(meta, st.cfg, checkpoint.step_dir(mngr, st.start), st.start, state["params"])
      ctx = None
      if program.objective is not None:
        ctx = {}
        if st.ewc:
          ctx["ewc"] = ewc
        if st.distill:
          ctx["teacher"] = teacher_params(workdir, stages, st, tr, mesh)
      it = train_iter(config, *feeds[st.index])
      if data_state is not None:
        try:
          it.set_state(data_state)
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(f"checkpoint {where}: data iterator state refused: {e}") from e
      begin = int(state["step"])
      stop = min(st.end, begin + budget if budget is not None else st.end, stop_at or st.end)
      out = loop.run_loop(program, state, it, mngr, book, evals, meta, tr, end=stop, pre=pre, stage_name=st.name,
                          ctx=ctx)
    finally:  # also on errors: finish in-flight async saves so the last good checkpoint is whole
      mngr.wait_until_finished()
      mngr.close()
    result.update({k: v for k, v in out.items() if k != "certificates"}, stage=st.index)
    if budget is not None:
      budget -= out["step"] - begin
    if out["preempted"] or out["step"] < st.end:
      result["stopped_early"] = not out["preempted"]
      break
    if st.index > 0:
      result["forgetting"] = _forgetting(workdir, st, stages, out, evals, mesh, book)
  book.close()
  result.setdefault("stopped_early", False)
  return result


def _forgetting(workdir, st: Stage, stages, out, evals, mesh, book) -> dict:
  """The end-of-stage forgetting report against the source model's loss at the boundary."""
  cert_path = os.path.join(workdir, "growth", f"{st.start}.json")
  before = None
  if os.path.exists(cert_path):
    with open(cert_path) as f:
      before = json.load(f).get("eval_before")
  now = {d: out[f"eval/{d}/loss"] for d in evals if f"eval/{d}/loss" in out}
  row = forgetting.stage_report(workdir, st.index, out["step"], stages[st.index - 1].cfg, st.cfg,
                                out["state"]["params"], evals, now, before, mesh)
  if row:
    book.write(out["step"], row)
    book.say("forgetting: " + ", ".join(f"{k} {v:+.4f}" for k, v in row.items()))
  return row
