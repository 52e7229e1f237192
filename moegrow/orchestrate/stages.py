"""Stages: a run is a list of stages; growth happens at their boundaries (the orchestrator).

This module applies the load order and runs the stages; what each stage is comes from
`moegrow.orchestrate.parts`, and the growth at a boundary is `moegrow.orchestrate.boundary.grow_checkpoint`.

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

Continual learning (growth stages; docs/continual.md): `replay` mixes in the
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
import ml_collections

from moegrow import checkpoint, data
from moegrow.train import forgetting, loop
from moegrow.orchestrate.boundary import (GrowthData, GrowthSource, certificate_text, ewc_abstract, fisher_batches,
                                          grow_checkpoint, teacher_params)
from moegrow.train.logbook import Logbook
from moegrow.orchestrate.parts import (Stage, adapter_stage, checkpoint_meta, config_diff, eval_sets, growth_key,
                                latest, make_mesh, manager, model_config, objective, resolve_stages,
                                stage_data, stage_train, state_bytes, train_iter)
from moegrow.orchestrate.validate import validate_config
from moegrow.train.steps import build_program
from moegrow.workdir_lock import WorkdirLock


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
    while True:
      try:
        return _run_stages(config, workdir, pre)
      except checkpoint.CorruptCheckpoint as e:
        if config.train.get("on_corrupt_checkpoint", "stop") != "previous" or not _own(workdir, e.where):
          raise
        _quarantine(workdir, e)  # then resume from the newest checkpoint left


def _own(workdir: str, where: str | None) -> bool:
  """Whether `where` is a step directory of this run (not a growth source or teacher elsewhere)."""
  return where is not None and os.path.dirname(os.path.abspath(where)) == os.path.join(
      os.path.abspath(workdir), "checkpoints")


def _quarantine(workdir: str, e: checkpoint.CorruptCheckpoint) -> None:
  """Move a corrupt checkpoint of this run to <workdir>/corrupt/ (never deleted), saying so."""
  if jax.process_index() == 0:
    dest = os.path.join(workdir, "corrupt", os.path.basename(e.where))
    n = 1
    while os.path.exists(dest):  # the same step corrupt again: keep every copy
      dest, n = os.path.join(workdir, "corrupt", f"{os.path.basename(e.where)}.{n}"), n + 1
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.replace(e.where, dest)
    print(f"{e}\non_corrupt_checkpoint='previous': moved it to {dest}; resuming from the newest checkpoint left",
          flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("moegrow: corrupt checkpoint moved")


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
    evals = eval_sets(config, list(stages[stage].mixture or config.data.mixture))
    held = {d: b[:1] for d, b in evals.items()}
    try:
      mesh = make_mesh(config)
      source = GrowthSource(src, step, stage_train(tr, stages[stage - 1]))
      measure = GrowthData(held, fisher_batches=fisher_batches(config, stages, stage))
      _, _, cert, _ = grow_checkpoint(source, stages[stage], tr, mesh, measure, dst, workdir, growth_key(tr.seed, stage))
    finally:
      dst.close()
      src.close()
    cert["preempted"] = pre.flag  # SIGTERM during growth: it finished and saved first
  return cert


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every stage of one run shares."""
  config: Any
  workdir: str
  pre: loop.Preempted
  mesh: Any
  stages: list[Stage]
  tr: Any  # the train config, its `steps` the end of the last stage
  book: Logbook
  feeds: list  # per stage: (mixture, replay)
  evals: dict  # {domain: [batch]}
  held: dict  # {domain: [first batch]}: the growth certificate's rows


def _start_run(config, workdir: str, pre: loop.Preempted) -> _Run:
  """The mesh, the stages, one train config over all of them, the logbook, each stage's data and
  the evaluation sets of every domain any stage's mixture lists (a weight of 0 evaluates a domain
  that is not trained on) or replays."""
  mesh = make_mesh(config)
  stages = resolve_stages(config, model_config(config))
  tr = ml_collections.ConfigDict(config.train.to_dict())
  tr.steps = stages[-1].end  # one schedule over all stages; the Adam count carries through growth
  book = Logbook(workdir, tr.steps)
  feeds = stage_data(config, stages)
  domains = list(dict.fromkeys(n for m, r in feeds for n in data.domain_order(m, r)
                               if n in m or (r is not None and r.mixture.get(n, 0) > 0)))
  evals = eval_sets(config, domains)
  held = {d: b[:1] for d, b in evals.items()}
  return _Run(config, workdir, pre, mesh, stages, tr, book, feeds, evals, held)


def _run_stages(config, workdir: str, pre: loop.Preempted) -> dict[str, Any]:
  """Train every stage not finished yet, from this run's newest checkpoint; the final metrics."""
  run = _start_run(config, workdir, pre)
  at_stage, at_step = latest(workdir, run.stages, run.tr)
  run.book.truncate_after(at_step or 0)  # rows past the restored step are replayed: each step once
  budget = run.tr.get("stop_after_steps", 0) or None  # steps this invocation may train
  stop_at = run.tr.get("stop_at_step", 0) or None  # global step at which this invocation ends
  result: dict[str, Any] = {"preempted": False}
  for st in run.stages:
    if st.index < at_stage or (st.index == at_stage and at_step >= st.end and st.index < len(run.stages) - 1):
      continue  # finished earlier (a finished stage's successor grows from its checkpoint below)
    if pre.flag:  # SIGTERM before this stage started: what is on disk is resumable as it is
      run.book.say(f"SIGTERM: stopping before stage {st.index}; run the same command to resume")
      result["preempted"] = True
      break
    ran = _run_stage(run, st, (at_stage, at_step), budget, stop_at, result)
    if ran is None:  # SIGTERM during growth
      break
    out, begin = ran
    result.update({k: v for k, v in out.items() if k != "certificates"}, stage=st.index)
    if budget is not None:
      budget -= out["step"] - begin
    if out["preempted"] or out["step"] < st.end:
      result["stopped_early"] = not out["preempted"]
      break
    if st.index > 0:
      result["forgetting"] = _forgetting(run, st, out)
  run.book.close()
  result.setdefault("stopped_early", False)
  return result


def _run_stage(run: _Run, st: Stage, at: tuple[int, int], budget: int | None, stop_at: int | None,
               result: dict) -> tuple[dict, int] | None:
  """Load stage `st`'s state (resumed from `at` = (stage, step), initialised or grown) and train it
  until its end, the step budget or `stop_at`. Returns (the loop's result, the step it began at),
  or None after SIGTERM during growth (`result` says so)."""
  mngr = manager(run.workdir, st.index, run.tr, pinned=(st.start,) if adapter_stage(st) else ())
  try:
    program = build_program(st.cfg, stage_train(run.tr, st), run.mesh, objective(st, run.stages))
    run.book.say(f"stage {st.index} ({st.name}): " + state_bytes(program.abstract_state))
    loaded = _load_stage(run, st, program, mngr, at, result)
    if loaded is None:
      return None
    state, meta, data_state, where, ewc = loaded
    if adapter_stage(st) and "adapters" not in meta:  # the stage's first checkpoint is the adapters' base
      meta = checkpoint.with_adapters(meta, st.cfg, checkpoint.step_dir(mngr, st.start), st.start, state["params"])
    ctx = _objective_inputs(run, st, program, ewc)
    it = _stage_iter(run, st, data_state, where)
    begin = int(state["step"])
    stop = min(st.end, begin + budget if budget is not None else st.end, stop_at or st.end)
    out = loop.run_loop(program, state, it, mngr, run.book, run.evals, meta, run.tr, end=stop, pre=run.pre,
                        stage_name=st.name, ctx=ctx)
  finally:  # also on errors: finish in-flight async saves so the last good checkpoint is whole
    mngr.wait_until_finished()
    mngr.close()
  return out, begin


def _load_stage(run: _Run, st: Stage, program, mngr, at: tuple[int, int], result: dict) -> tuple | None:
  """Stage `st`'s first state as (state, metadata, data iterator state, where it came from, ewc
  item): resumed from this run's newest checkpoint `at` = (stage, step), initialised (stage 0), or
  grown from the previous stage's final checkpoint. None after SIGTERM during growth."""
  at_stage, at_step = at
  if st.index == at_stage:
    return _resume(run, st, program, mngr, at_step)
  if st.index == 0:
    state, data_state, where = program.init(jax.random.key(run.tr.seed)), None, "init"
    return state, checkpoint_meta(st, [], step=0), data_state, where, None
  return _grow_into(run, st, mngr, result)


def _resume(run: _Run, st: Stage, program, mngr, step: int) -> tuple:
  """Stage `st`'s state restored from its checkpoint at `step` (refused if it holds another model)."""
  where = checkpoint.step_dir(mngr, step)
  stored_cfg = checkpoint.model_config(checkpoint.read_meta(mngr, step))  # validated metadata
  if stored_cfg != st.cfg:
    raise ValueError(f"checkpoint {where} holds a different model than stage {st.index} of the config: "
                     f"{config_diff(stored_cfg, st.cfg)}")
  state, meta, data_state = checkpoint.restore(mngr, step, program.abstract_state)
  ewc = None
  if st.ewc:
    ewc = checkpoint.restore_item(mngr, step, checkpoint.EWC, ewc_abstract(st.cfg, run.mesh))
  run.book.say(f"resumed from {where} at step {step} (stage {st.index}: {st.name})")
  return state, meta, data_state, where, ewc


def _grow_into(run: _Run, st: Stage, mngr, result: dict) -> tuple | None:
  """The previous stage's final checkpoint grown into stage `st` and saved as its first checkpoint;
  the certificate is appended to result['certificates']. None after SIGTERM during growth (the
  grown checkpoint is saved; `result` records the stop)."""
  src = manager(run.workdir, st.index - 1, run.tr, read_only=True)
  run.book.say(f"growing {checkpoint.step_dir(src, src.latest_step())} into stage {st.index} ({st.name}): "
               f"{', '.join(o['op'] for o in st.ops) or 'no ops (same model)'}")
  source = GrowthSource(src, src.latest_step(), stage_train(run.tr, run.stages[st.index - 1]))
  measure = GrowthData(run.held, run.evals, fisher_batches(run.config, run.stages, st.index))
  state, data_state, cert, ewc = grow_checkpoint(source, st, run.tr, run.mesh, measure, mngr, run.workdir,
                                                 growth_key(run.tr.seed, st.index))
  src.close()
  run.book.say(certificate_text(cert))
  where = checkpoint.step_dir(mngr, int(state["step"]))
  meta = checkpoint.read_meta(mngr, int(state["step"]))
  result.setdefault("certificates", []).append(cert)
  if run.pre.flag:  # SIGTERM during growth: the grown checkpoint is saved; stop here
    run.book.say(f"SIGTERM during growth: the grown checkpoint {where} is saved; exiting. Run the same command "
                 "to resume")
    result.update(preempted=True, step=int(state["step"]), stage=st.index)
    return None
  return state, meta, data_state, where, ewc


def _objective_inputs(run: _Run, st: Stage, program, ewc) -> dict | None:
  """The train step's fixed inputs for the stage's objective (EWC's item, the distillation
  teacher), or None without an objective."""
  if program.objective is None:
    return None
  ctx = {}
  if st.ewc:
    ctx["ewc"] = ewc
  if st.distill:
    ctx["teacher"] = teacher_params(run.workdir, run.stages, st, run.tr, run.mesh)
  return ctx


def _stage_iter(run: _Run, st: Stage, data_state, where: str):
  """Stage `st`'s data iterator, resumed from `data_state` (None: from the start)."""
  it = train_iter(run.config, *run.feeds[st.index])
  if data_state is not None:
    try:
      it.set_state(data_state)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {where}: data iterator state refused: {e}") from e
  return it


def _forgetting(run: _Run, st: Stage, out: dict) -> dict:
  """The end-of-stage forgetting report against the source model's loss at the boundary."""
  cert_path = os.path.join(run.workdir, "growth", f"{st.start}.json")
  before = None
  if os.path.exists(cert_path):
    with open(cert_path) as f:
      before = json.load(f).get("eval_before")
  now = {d: out[f"eval/{d}/loss"] for d in run.evals if f"eval/{d}/loss" in out}
  row = forgetting.stage_report(run.workdir, st.index, out["step"], run.stages[st.index - 1].cfg, st.cfg,
                                out["state"]["params"], run.evals, now, before, run.mesh)
  if row:
    run.book.write(out["step"], row)
    run.book.say("forgetting: " + ", ".join(f"{k} {v:+.4f}" for k, v in row.items()))
  return row
