"""Growth at a stage boundary: restore the finished stage's checkpoint at its own shapes, apply
the next stage's ops to params and Adam moments in one jit, certify and save (docs/growth.md).

`grow_checkpoint` is the one place that grows a checkpoint; `moegrow.orchestrate.stages` calls it at a
boundary during a run and from `grow_offline`. The data-dependent inputs of the ops (expert
loads, router centroids, EWC's Fisher) are measured here on the source model and passed to the
pure surgery functions as arguments. The source checkpoint is never written to.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moegrow import checkpoint, data, sharding
from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.surgery import apply as surgery
from moegrow.surgery import shrink_ops
from moegrow.train import continual, optim, probes
from moegrow.orchestrate.parts import (Stage, checkpoint_meta, config_diff, manager, stage_data, stage_train,
                                train_iter)
from moegrow.params.trees import to_plain
from moegrow.train.steps import build_program, params_sharding


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


def _needs_scores(o: dict) -> bool:
  """prune_experts(saliency='frequency' or 'reap') without `scores`."""
  return o.get("op") == "prune_experts" and o.get("saliency", "frequency") in ("frequency", "reap") \
      and not o.get("scores")


def _needs_features(o: dict) -> bool:
  """merge_experts(grouping='output' or 'router') without `features`, or without `usage`."""
  return o.get("op") == "merge_experts" and (
      (o.get("grouping", "output") in ("output", "router") and not o.get("features")) or not o.get("usage"))


def _needs_perms(o: dict) -> bool:
  """merge_experts(align=True) without `perms`."""
  return o.get("op") == "merge_experts" and bool(o.get("align")) and not o.get("perms")


def _needs_centroids(o: dict) -> bool:
  """add_experts(router_init='hidden') without `centroids`."""
  return o.get("op") == "add_experts" and o.get("router_init") == "hidden" and not o.get("centroids")


def with_loads(ops: list[dict], measure, measure_means=None, measure_reap=None, measure_features=None,
               measure_perms=None) -> list[dict]:
  """Ops with the data they need measured: add_experts(source='most_loaded') and
  to_dense(mode='concat_topk') get `loads` (`measure()`); add_experts(router_init='hidden') gets
  `centroids` {layer: [mean MLP input of the other domains, of router_domain]} from
  `measure_means()` ({layer: {domain: mean}}, `probes.mlp_input_means` of the old model);
  prune_experts gets `scores`: the loads for saliency='frequency', `measure_reap()`
  (`probes.reap_scores`) for 'reap'; merge_experts gets `usage` (the loads) and `features` (its
  grouping's entry of `measure_features()`, `probes.expert_features`), and with align=True `perms`
  (`measure_perms(usage)`: hidden-unit permutations onto each layer's most used expert)."""
  out = [dict(o) for o in ops]
  loads = None
  if any(_needs_loads(o) or _needs_features(o) or (_needs_scores(o) and o.get("saliency", "frequency") == "frequency")
         for o in out):
    loads = measure()
  feats = measure_features() if any(_needs_features(o) and o.get("grouping", "output") != "list" for o in out) \
      else None
  for o in out:
    if _needs_features(o):
      if not o.get("usage"):
        o["usage"] = loads
      if o.get("grouping", "output") != "list" and not o.get("features"):
        o["features"] = {i: f[o.get("grouping", "output")] for i, f in feats.items()}
    if _needs_perms(o):
      o["perms"] = measure_perms(o.get("usage"))
  reap = measure_reap() if any(_needs_scores(o) and o.get("saliency") == "reap" for o in out) else None
  for o in out:
    if _needs_loads(o):
      o["loads"] = loads
    elif _needs_scores(o):
      o["scores"] = reap if o.get("saliency") == "reap" else loads
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


def growth_fn(old_cfg: ModelConfig, ops: list[dict], new, with_fisher: bool = False):
  """The growth of a whole train state as one jittable function (the ops on params and Adam
  moments, the new optimizer state built around the grown moments; with `with_fisher`, EWC's
  Fisher remapped and the anchor). Returns (fn(state, key, fisher) -> (grown state, ewc item or
  None), out_shardings on `new`'s mesh, box): box['reports'] holds the ops' reports once traced.
  `moegrow.aot` compiles the same function for a TPU slice."""
  box: dict[str, Any] = {}

  def run(state, k, fisher):
    moments = optim.adam_moments(state["opt_state"], state["params"])
    out, _, box["reports"] = surgery.apply_ops({"params": state["params"], "mu": moments["mu"], "nu": moments["nu"]},
                                               old_cfg, ops, k, shapes=tf.abstract_params)
    opt = optim.with_adam_moments(new.tx.init(out["params"]), out["mu"], out["nu"], moments["count"])
    grown = {"params": out["params"], "opt_state": opt, "step": state["step"]}
    if fisher is None:
      return grown, None
    f = surgery.remap(fisher, old_cfg, ops, k, shapes=tf.abstract_params, kind="fisher")
    f = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), f)
    anchor = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), out["params"])  # theta*: the grown params
    return grown, {"fisher": f, "anchor": anchor}
  p_sh = new.state_sharding["params"]
  return run, (new.state_sharding, {"fisher": p_sh, "anchor": p_sh} if with_fisher else None), box


@dataclasses.dataclass(frozen=True)
class GrowthSource:
  """The checkpoint a boundary grows from: its manager (never written to), its step, and the train
  config of the stage that wrote it (its optimizer state's; None: the new stage's)."""
  mngr: Any
  step: int
  tr: Any = None


@dataclasses.dataclass(frozen=True)
class GrowthData:
  """What the source model is measured on at a boundary. `held`: {domain: [batch]} for the
  certificate; `evals` (optional): {domain: [batch]} on which the source's loss is recorded as the
  reference for forgetting (`eval_before`); `fisher_batches`: global batches of the source stage's
  data for EWC's Fisher (with `stage.ewc`)."""
  held: dict
  evals: dict | None = None
  fisher_batches: list | None = None


def grow_checkpoint(src: GrowthSource, stage: Stage, tr, mesh, measure: GrowthData, dst_mngr, workdir: str,
                    key) -> tuple[dict, Any, dict, dict | None]:
  """Restore `src` at its own shapes, apply `stage.ops`, save as `stage`'s first checkpoint.

  With `stage.ewc`, `measure.fisher_batches` give the source's diagonal Fisher; online EWC adds
  gamma times the source checkpoint's own Fisher. The Fisher goes through the ops' rules (kind
  'fisher': new slices 0) and the anchor is the grown params (the ops' image of the source's).
  Returns (grown state, data iterator state of the new stage, growth certificate, ewc item or
  None). Memory: the old state is released before the save, and the new optimizer state is built
  in the same jit as its moments."""
  held = _certificate_rows(measure.held, mesh)
  old_cfg, old, state, meta, data_state = _restore_source(src, tr, mesh)
  before = _domain_losses(old, state["params"], held)
  eval_before = _domain_losses(old, state["params"], measure.evals) if measure.evals else None
  fisher = _source_fisher(src, stage, old_cfg, state["params"], measure.fisher_batches, key, mesh)
  params_before = _param_count(state["params"])
  ops = _measured_ops(src.step, stage, old_cfg, state["params"], held, measure.evals, mesh)
  new = build_program(stage.cfg, stage_train(tr, stage), mesh)
  run, out_sh, box = growth_fn(old_cfg, ops, new, with_fisher=fisher is not None)
  new_state, ewc = jax.jit(run, out_shardings=out_sh)(state, key, fisher)
  del state, fisher  # the old state is no longer needed: free it before the save
  new_state, ewc = own_buffers((new_state, ewc))
  after = _domain_losses(new, new_state["params"], held)
  new_meta = checkpoint_meta(stage, meta.get("lineage", []), src.step, ops)
  cert = {"step": int(src.step), "stage": stage.index, "name": stage.name,
          "source": checkpoint.step_dir(src.mngr, src.step), "ops": to_plain(ops),
          "loss_before": before, "loss_after": after, "loss_change": {d: after[d] - before[d] for d in before},
          "eval_before": eval_before,
          "params_before": params_before,
          "params_after": _param_count(new_state["params"]),
          "reports": box["reports"]}
  _refuse_nonfinite_losses(cert)
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "growth", f"{int(src.step)}.json"), cert)
  if data_state is not None:  # the new stage's stream: every domain resumes by name, rows from 0
    data_state = data.stage_start(data_state)
  checkpoint.save(dst_mngr, src.step, new_state, new_meta, data_state, ewc=ewc)
  dst_mngr.wait_until_finished()
  return new_state, data_state, cert, ewc


def _refuse_nonfinite_losses(cert: dict) -> None:
  """A growth whose held-out loss before or after is not finite writes nothing (no certificate, no
  checkpoint): the error names the source checkpoint."""
  bad = {f"{when} {d}": v for when in ("before", "after") for d, v in cert[f"loss_{when}"].items()
         if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(f"growing checkpoint {cert['source']}: the held-out loss is not finite ({bad}); "
                             f"nothing was written")


def _restore_source(src: GrowthSource, tr, mesh) -> tuple:
  """The source checkpoint restored at its own shapes (from its stored model config) on `mesh`:
  (its model config, its Program, state, metadata, data iterator state)."""
  old_cfg = checkpoint.model_config(checkpoint.read_meta(src.mngr, src.step))
  old = build_program(old_cfg, tr if src.tr is None else src.tr, mesh)  # the source stage's optimizer
  state, meta, data_state = checkpoint.restore(src.mngr, src.step, old.abstract_state)
  return old_cfg, old, state, meta, data_state


def _domain_losses(program, params, batches: dict) -> dict[str, float]:
  """{domain: held-out loss} of `params` on {domain: [batch]}."""
  return {d: m["loss"] for d, m in probes.domain_losses(program, params, batches).items()}


def _param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _source_fisher(src: GrowthSource, stage: Stage, old_cfg: ModelConfig, params, batches, key, mesh):
  """EWC's diagonal Fisher of the source model on `batches` (None without `stage.ewc`); online EWC
  (gamma set) adds gamma times the source checkpoint's own Fisher, if it has one."""
  if not stage.ewc:
    return None
  fisher = probes.fisher_diagonal(old_cfg, params, batches, labels=stage.ewc["labels"],
                                  key=jax.random.fold_in(key, 77))
  if stage.ewc["gamma"] is not None and checkpoint.has_item(src.mngr, src.step, checkpoint.EWC):
    earlier = checkpoint.restore_item(src.mngr, src.step, checkpoint.EWC, ewc_abstract(old_cfg, mesh))
    fisher = continual.online_fisher(earlier["fisher"], fisher, float(stage.ewc["gamma"]))  # Schwarz et al. 2018
  return fisher


def _measured_ops(src_step: int, stage: Stage, old_cfg: ModelConfig, params, held: dict, evals, mesh) -> list[dict]:
  """The stage's ops with the data they need measured on the source model (`with_loads`);
  ValueError if they do not grow the checkpoint's model into the stage's."""
  rows = [b for bs in held.values() for b in bs]
  ops = with_loads(list(stage.ops), lambda: probes.expert_loads(old_cfg, params, rows, mesh),
                   lambda: probes.mlp_input_means(old_cfg, params, evals or held, mesh),
                   lambda: probes.reap_scores(old_cfg, params, rows, mesh),
                   lambda: probes.expert_features(old_cfg, params, rows, mesh),
                   lambda usage: _hidden_unit_perms(old_cfg, params, usage))
  grown_cfg = surgery.grown_config(old_cfg, ops)
  if grown_cfg != stage.cfg:
    raise ValueError(f"stage {stage.index} ({stage.name}): growing the checkpoint at step {src_step} gives "
                     f"{config_diff(grown_cfg, stage.cfg)}; the checkpoint's model differs from the config's")
  return ops


def _hidden_unit_perms(cfg: ModelConfig, params, usage) -> dict[str, list]:
  """{layer: [E, F] permutations} aligning each MoE layer's experts to its most used one (by
  `usage`; expert 0 without), by weight matching on the (replicated, host-local) expert tables."""
  out = {}
  for i in cfg.moe_layer_ids:
    m = params["blocks"][str(i)]["mlp"]
    u = None if usage is None else usage.get(str(i), usage.get(i))
    ref = int(np.argmax(u)) if u is not None else 0
    host = lambda x: None if x is None else np.asarray(multihost_utils.process_allgather(x, tiled=True))
    out[str(i)] = shrink_ops.hidden_unit_perms(host(m["wact_EDF"]), host(m.get("wlin_EDF")), host(m["wo_EFD"]),
                                               ref).tolist()
  return out


def certificate_text(cert: dict) -> str:
  """A growth certificate as printed lines: the ops, the parameter count, the loss per domain."""
  lines = [f"growth certificate @ step {cert['step']} -> stage {cert['stage']} ({cert['name']}): "
           f"{', '.join(o['op'] for o in cert['ops'])}; params {cert['params_before']:,} -> {cert['params_after']:,}"]
  for d in cert["loss_before"]:
    lines.append(f"  {d:<20} held-out loss {cert['loss_before'][d]:.5f} -> {cert['loss_after'][d]:.5f} "
                 f"(change {cert['loss_change'][d]:+.2e})")
  return "\n".join(lines)


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
