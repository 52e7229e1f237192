"""Merge finished checkpoints into a new run's first checkpoint (the orchestrator of merges).

A merge config is an ordinary run config (model, data, train, mesh) with a `merge` section:
  merge.sources   checkpoint paths (a run's workdir, its checkpoints dir or one step's dir)
  merge.base      the base model for task-vector methods ('' for none)
  merge.method    one of moegrow.surgery.merge.METHODS; merge.params its parameters
  merge.overrides [(path regex, {param: value})]; merge.seed (random methods)
The sources are restored at their own (identical) model config on the current mesh, merged by
`moegrow.surgery.merge.merge` under jit, and saved as step 0 of `workdir` with a fresh optimizer
state and lineage naming every source and the method: `moegrow.main` with the same config and
workdir then trains it, and later stages grow it. The per-domain validation loss of every source
and of the result is printed and written to `<workdir>/merge.json` with the source -> target
path map. A config with a `btx` section instead runs Branch-Train-MiX (moegrow.orchestrate.branching). Sources are only read.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from moegrow import checkpoint
from moegrow.orchestrate import parts, stages
from moegrow.params.trees import flatten, to_plain
from moegrow.surgery import merge as merge_ops
from moegrow.train import loop, probes
from moegrow.train.logbook import print_table
from moegrow.train.steps import build_program
from moegrow.workdir_lock import WorkdirLock


def restore_params(source: str, mesh, tr) -> tuple[dict, Any, str]:
  """(params, model config, step directory) of the checkpoint at `source`, on `mesh`."""
  src_dir, prefix, step = checkpoint.locate(source)
  mngr = checkpoint.manager(src_dir, read_only=True, step_prefix=prefix)
  try:
    cfg = checkpoint.model_config(checkpoint.read_meta(mngr, step))
    state, _, _ = checkpoint.restore(mngr, step, build_program(cfg, tr, mesh).abstract_state)
    return state["params"], cfg, checkpoint.step_dir(mngr, step)
  finally:
    mngr.close()


def fresh_state(program, params) -> dict:
  """A run's step-0 state around `params`: a fresh optimizer state, sharded like `program`'s."""
  return jax.jit(lambda p: {"params": p, "opt_state": program.tx.init(p), "step": jnp.zeros((), jnp.int32)},
                 out_shardings=program.state_sharding)(params)


def _refuse_nonfinite_losses(sources: dict[str, dict], result: dict[str, float]) -> None:
  """A merge whose sources or result have a non-finite held-out loss writes nothing; the error names
  the source checkpoint (or the merge)."""
  for where, losses in [*sources.items(), ("the merged model", result)]:
    bad = {d: v for d, v in losses.items() if not math.isfinite(v)}
    if bad:
      raise FloatingPointError(f"merge: the held-out loss of {where} is not finite ({bad}); nothing was written")


def merge_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Merge `config.merge.sources` into step 0 of `workdir`; returns the merge certificate."""
  stages.prepare(config, workdir)
  m = config.merge
  sources = list(m.sources)
  if not sources:
    raise ValueError("config: merge.sources is empty; name the checkpoints to merge")
  tr, mesh = config.train, parts.make_mesh(config)
  with WorkdirLock(workdir, enabled=jax.process_index() == 0), loop.Preempted():
    out = parts.manager(workdir, 0, tr)
    try:
      if out.latest_step() is not None:
        raise ValueError(f"{workdir} already holds checkpoints; merge into a new --workdir")
      restored = [restore_params(s, mesh, tr) for s in sources]
      base = restore_params(m.base, mesh, tr) if m.get("base") else None
      cfgs = {c for _, c, _ in restored + ([base] if base else [])}
      if len(cfgs) > 1:
        first = restored[0][1]
        odd = [(w, parts.config_diff(c, first)) for _, c, w in restored + ([base] if base else []) if c != first]
        raise ValueError(f"merge: the checkpoints hold different models: {odd[0][0]} differs from "
                         f"{restored[0][2]} in {odd[0][1]}")
      cfg = restored[0][1]
      if cfg != parts.model_config(config):
        raise ValueError(f"merge: the sources' model differs from the config's: "
                         f"{parts.config_diff(cfg, parts.model_config(config))}")
      program = build_program(cfg, tr, mesh)
      merged = merge_ops.merge(m.method, [p for p, _, _ in restored], base[0] if base else None,
                               overrides=[tuple(o) for o in m.get("overrides", ())],
                               key=jax.random.key(int(m.get("seed", 0))), **to_plain(m.get("params", {})))
      state = fresh_state(program, merged)
      evals = parts.eval_sets(config)
      losses = {w: {d: v["loss"] for d, v in probes.domain_losses(program, p, evals).items()} for p, _, w in restored}
      result = {d: v["loss"] for d, v in probes.domain_losses(program, state["params"], evals).items()}
      _refuse_nonfinite_losses(losses, result)
      entry = {"merge": m.method, "params": to_plain(m.get("params", {})), "sources": [w for _, _, w in restored],
               "base": base[2] if base else None, "overrides": to_plain(list(m.get("overrides", ())))}
      meta = {"model": cfg.to_dict(), "stage": 0, "lineage": [entry]}
      checkpoint.save(out, 0, state, meta, None)
      out.wait_until_finished()
    finally:
      out.close()
  # Source -> target path map: a merge combines the same path of every source (and the base).
  srcs = [w for _, _, w in restored] + ([f"base {base[2]}"] if base else [])
  path_map = {p: [f"{w}: {p}" for w in srcs] for p in flatten(state["params"])}
  cert = dict(entry, loss_sources=losses, loss_result=result, path_map=path_map)
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(workdir, "merge.json"), cert)
    rows = [{"model": f"source {i}", **losses[w]} for i, (_, _, w) in enumerate(restored)]
    rows.append({"model": f"merged ({m.method})", **result})
    print_table(rows, ["model"] + list(result))
  return cert
