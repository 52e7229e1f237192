"""Growth at checkpoint boundaries: stages, restore at OLD shapes, grow under jit, certify.

A run's config may hold `stages`: stage 0 trains; each later stage names growth `ops` (see
`moegrow.grow.OPS`), its `steps`, and optionally a new data `mixture`. Stage 0's checkpoints
live in `<workdir>/checkpoints/<step>`, stage i's in `<workdir>/checkpoints/stage<i>_<step>`,
so the final checkpoint of a stage and the first (grown) checkpoint of the next share a step
number without sharing a directory. At a boundary (DESIGN.md section 4):
  1. the finished stage's final checkpoint is on disk;
  2. it is restored at its OWN shapes (from its stored model config) on the current mesh;
  3. the ops run under `jax.jit(..., out_shardings=<new shardings>)` on params and Adam moments;
  4. the result is checked against the new stage's abstract tree, the held-out loss per domain is
     measured before and after (the growth certificate, `<workdir>/growth/<step>.json`), and the
     grown state is saved as the new stage's first checkpoint (lineage in its metadata).
The source checkpoint is never written to; a crash before step 4 completes leaves the source
as the latest checkpoint, so a restart simply grows again.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moegrow import checkpoint, grow, optim, sharding
from moegrow import transformer as tf
from moegrow.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Stage:
  index: int
  name: str
  start: int  # global step at which the stage begins
  end: int  # global step at which it ends
  ops: tuple  # growth ops applied at `start` (empty for stage 0)
  mixture: dict | None  # None: the config's data.mixture
  cfg: ModelConfig  # the model trained in this stage


def grown_config(cfg: ModelConfig, ops) -> ModelConfig:
  """The config `ops` produce from `cfg`, traced abstractly (no FLOPs, no memory)."""
  if not ops:
    return cfg
  box = {}
  ops = [dict(o) for o in ops]
  for o in ops:  # loads only pick sources; they do not change the config
    if o.get("op") == "add_experts" and o.get("source") == "most_loaded" and not o.get("loads"):
      o["loads"] = {str(i): [1.0] * cfg.experts_in_layer(i) for i in cfg.moe_layer_ids}

  def run(params):
    _, box["cfg"], _ = grow.apply_ops({"params": params, "mu": None, "nu": None}, cfg, ops)
    return 0
  jax.eval_shape(run, tf.abstract_params(cfg))
  return box["cfg"]


def resolve_stages(config, base_cfg: ModelConfig) -> list[Stage]:
  """Stages from `config.stages` (or one stage of `config.train.steps` if there are none)."""
  specs = list(config.get("stages", None) or ())
  if not specs:
    return [Stage(0, "train", 0, int(config.train.steps), (), None, base_cfg)]
  stages, start, cfg = [], 0, base_cfg
  for i, spec in enumerate(specs):
    spec = dict(spec)
    unknown = sorted(set(spec) - {"name", "steps", "ops", "mixture"})
    if unknown:
      raise ValueError(f"stages[{i}]: unknown keys {unknown} (expected name, steps, ops, mixture)")
    ops = tuple(_plain(o) for o in spec.get("ops", ()) or ())
    if i == 0 and ops:
      raise ValueError("stages[0] trains the initial model and cannot have growth ops")
    if i > 0 and not ops:
      raise ValueError(f"stages[{i}] ({spec.get('name')}) has no growth ops")
    cfg = grown_config(cfg, ops)
    steps = int(spec["steps"])
    mixture = _plain(spec["mixture"]) if spec.get("mixture") else None
    stages.append(Stage(i, str(spec.get("name", f"stage{i}")), start, start + steps, ops, mixture, cfg))
    start += steps
  return stages


def _plain(x):
  """ConfigDict / FrozenConfigDict / tuples -> plain dicts and lists (JSON-friendly op args)."""
  if hasattr(x, "items"):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def manager(workdir: str, stage: int, tr, read_only: bool = False):
  return checkpoint.manager(os.path.join(workdir, "checkpoints"), keep=tr.keep_checkpoints,
                            async_save=tr.async_checkpoint, read_only=read_only,
                            step_prefix=None if stage == 0 else f"stage{stage}")


def latest(workdir: str, stages: list[Stage], tr) -> tuple[int, int | None]:
  """(stage index, step) of the newest checkpoint in `workdir`, or (-1, None)."""
  for st in reversed(stages):
    m = manager(workdir, st.index, tr, read_only=True)
    step = m.latest_step() if os.path.isdir(m.directory) else None
    m.close()
    if step is not None:
      return st.index, step
  return -1, None


def held_out_losses(program, params, held: dict[str, dict]) -> dict[str, float]:
  """Mean token loss of `params` on one fixed held-out batch per domain."""
  out = {}
  for domain, b in held.items():
    s, c = program.eval_step(params, sharding.from_full(b, program.batch_sharding))
    out[domain] = float(s) / float(c)
  return out


def _expert_loads(cfg: ModelConfig, params, held, mesh) -> dict[str, list[float]]:
  """Per-layer expert load on the held-out batches (for add_experts source='most_loaded')."""
  rows = np.concatenate([b["inputs"] for b in held.values()])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # readable on every process
  tokens = jax.make_array_from_callback(rows.shape, replicated, lambda i: rows[i])
  loads = jax.jit(lambda p, t: {i: m["load"] for i, m in tf.apply(cfg, p, t)[1]["layers"].items()},
                  out_shardings=replicated)(params, tokens)
  return {i: np.asarray(v).tolist() for i, v in loads.items()}


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
  return {d: {k: (v[:max(4, shards)] if isinstance(v, np.ndarray) else v) for k, v in b.items()}
          for d, b in held.items()}


def grow_checkpoint(src_mngr, src_step: int, stage: Stage, tr, mesh, build_program, held: dict,
                    dst_mngr, workdir: str, key) -> tuple[dict, Any, dict]:
  """Restore `src_step` at its own shapes, apply `stage.ops`, save as `stage`'s first checkpoint.

  Returns (grown state, data iterator state of the source, growth certificate). Memory: the old
  state is released before the save, and the new optimizer state is built in the same jit as
  its moments (no throw-away zero state)."""
  held = _certificate_rows(held, mesh)
  meta = checkpoint.read_meta(src_mngr, src_step)
  old_cfg = checkpoint.model_config(meta)
  old = build_program(old_cfg, tr, mesh)
  state, meta, data_state = checkpoint.restore(src_mngr, src_step, old.abstract_state)
  before = held_out_losses(old, state["params"], held)
  params_before = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(state["params"])))
  ops = [dict(o) for o in stage.ops]
  for o in ops:
    if o.get("op") == "add_experts" and o.get("source") == "most_loaded" and not o.get("loads"):
      o["loads"] = _expert_loads(old_cfg, state["params"], held, mesh)
  moments = optim.adam_moments(state["opt_state"])
  new = build_program(stage.cfg, tr, mesh)
  box: dict[str, Any] = {}

  def run(params, mu, nu, count, step, k):
    out, box["cfg"], box["reports"] = grow.apply_ops({"params": params, "mu": mu, "nu": nu}, old_cfg, ops, k)
    opt = optim.with_adam_moments(new.tx.init(out["params"]), out["mu"], out["nu"], count)
    return {"params": out["params"], "opt_state": opt, "step": step}
  new_state = jax.jit(run, out_shardings=new.state_sharding)(
      state["params"], moments["mu"], moments["nu"], moments["count"], state["step"], key)
  del state, moments  # the old state is no longer needed: free it before the save
  if box["cfg"] != stage.cfg:
    raise ValueError(f"stage {stage.index} ({stage.name}): growing the checkpoint at step {src_step} gave "
                     f"{config_diff(box['cfg'], stage.cfg)}; the checkpoint's model differs from the config's")
  new_state = own_buffers(new_state)
  after = held_out_losses(new, new_state["params"], held)
  lineage = list(meta.get("lineage", [])) + [{"stage": stage.index, "name": stage.name, "step": int(src_step),
                                              "ops": ops}]
  new_meta = {"model": stage.cfg.to_dict(), "stage": stage.index, "lineage": lineage}
  cert = {"step": int(src_step), "stage": stage.index, "name": stage.name, "source": checkpoint.step_dir(src_mngr, src_step),
          "ops": ops, "loss_before": before, "loss_after": after,
          "loss_change": {d: after[d] - before[d] for d in before},
          "params_before": params_before,
          "params_after": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(new_state["params"]))),
          "reports": box["reports"]}
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "growth", f"{int(src_step)}.json"), cert)
  checkpoint.save(dst_mngr, src_step, new_state, new_meta, data_state)
  dst_mngr.wait_until_finished()
  return new_state, data_state, cert


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
  from moegrow import train  # the trainer builds programs; boundary stays importable without it
  src_dir, prefix, step = checkpoint.locate(source)
  src = checkpoint.manager(src_dir, read_only=True, step_prefix=prefix)
  src_cfg = checkpoint.model_config(checkpoint.read_meta(src, step))
  stages = resolve_stages(config, train.model_config(config))
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
  dst = manager(workdir, stage, tr)
  if dst.latest_step() is not None:
    raise ValueError(f"{workdir} already holds stage {stage} checkpoints; use a new --workdir")
  evals = train.eval_sets(config, [n for n, w in dict(stages[stage].mixture or config.data.mixture).items() if w > 0])
  held = {d: b[0] for d, b in evals.items()}
  try:
    _, _, cert = grow_checkpoint(src, step, stages[stage], tr, train.make_mesh(config), train.build_program,
                                 held, dst, workdir, jax.random.fold_in(jax.random.key(tr.seed), 1000 + stage))
  finally:
    dst.close()
    src.close()
  return cert
