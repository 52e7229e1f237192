"""Training: sharded train/eval steps and the resumable, preemptible loop.

`train_and_evaluate(config, workdir)` is the whole job. Load order, in one place:
resume this run's latest checkpoint > scratch. State is a plain dict
`{'params', 'opt_state', 'step'}`; every jitted function names its in/out shardings.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moegrow import boundary, checkpoint, data, optim, sharding
from moegrow import transformer as tf
from moegrow.config import ModelConfig
from moegrow.logbook import Logbook, flatten_metrics, print_table


# ------------------------------------------------------------------ steps

def lm_loss(cfg: ModelConfig, params, batch, rng=None):
  """Mean next-token cross-entropy + the model's weighted MoE losses."""
  logits_BTV, aux = tf.apply(cfg, params, batch["inputs"], rng)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"]).mean()
  moe = {i: {k: m[k] for k in ("load", "dropped", "router_entropy")} for i, m in aux["layers"].items()}
  return ce + aux["loss"], {"ce": ce, "aux_loss": aux["aux_loss"], "z_loss": aux["z_loss"], "moe": moe}


@dataclasses.dataclass(frozen=True)
class Program:
  """Everything compiled for one model config on one mesh."""
  cfg: ModelConfig
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: Callable
  abstract_state: Any  # ShapeDtypeStructs with shardings
  state_sharding: Any
  batch_sharding: NamedSharding
  init: Callable  # key -> state
  train_step: Callable  # (state, batch) -> (state, metrics)
  eval_step: Callable  # (params, batch) -> (sum_nll, count)


def state_shardings(cfg: ModelConfig, tx, mesh: Mesh):
  """(abstract state with shardings, sharding tree) for params, optimizer state and step."""
  params = tf.abstract_params(cfg)
  p_sh = sharding.tree_shardings(tf.logical_axes(cfg), mesh, params)
  opt = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  o_sh = optax.tree_map_params(tx, lambda _, s: s, opt, p_sh, transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))
  sh = {"params": p_sh, "opt_state": o_sh, "step": replicated}
  shapes = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
  abstract = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, sh)
  return abstract, sh


def build_program(cfg: ModelConfig, train_cfg, mesh: Mesh) -> Program:
  tx = optim.make_optimizer(train_cfg, tf.abstract_params(cfg))
  schedule = optim.make_schedule(train_cfg.lr, train_cfg.steps, train_cfg.warmup_steps, train_cfg.schedule,
                                 train_cfg.get("min_lr_ratio", 0.1))
  abstract, sh = state_shardings(cfg, tx, mesh)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), mesh=mesh))
  seed = int(train_cfg.seed)

  def init(key):
    params = tf.init_params(cfg, key)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def train_step(state, batch):
    with sharding.use_mesh(mesh):
      rng = jax.random.fold_in(jax.random.key(seed + 1), state["step"])
      grad_fn = jax.value_and_grad(lambda p: lm_loss(cfg, p, batch, rng), has_aux=True)
      (loss, aux), grads = grad_fn(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  def eval_step(params, batch):
    with sharding.use_mesh(mesh):
      logits, _ = tf.apply(cfg, params, batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = (batch["targets"] != data.PAD_ID).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)

  batch_tree = {"inputs": batch_sh, "targets": batch_sh}
  replicated = NamedSharding(mesh, P())  # metrics: readable on every process
  return Program(
      cfg=cfg, mesh=mesh, tx=tx, schedule=schedule, abstract_state=abstract, state_sharding=sh,
      batch_sharding=batch_sh,
      init=jax.jit(init, out_shardings=sh),
      train_step=jax.jit(train_step, in_shardings=(sh, batch_tree), out_shardings=(sh, replicated),
                         donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(sh["params"], batch_tree), out_shardings=replicated))


def to_global(program: Program, local: dict) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
  out = {}
  for k in ("inputs", "targets"):
    x = np.asarray(local[k])
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    out[k] = jax.make_array_from_process_local_data(program.batch_sharding, x, shape)
  return out


def evaluate(program: Program, params, eval_sets: dict[str, list[dict]]) -> dict[str, float]:
  """Per-domain mean loss (nats/token) and bits per byte on fixed validation batches."""
  out = {}
  for domain, batches in eval_sets.items():
    nll = count = nbytes = 0.0
    for b in batches:
      s, c = program.eval_step(params, sharding.from_full(b, program.batch_sharding))
      nll, count, nbytes = nll + float(s), count + float(c), nbytes + b["num_bytes"]
    out[f"eval/{domain}/loss"] = nll / count
    out[f"eval/{domain}/bpb"] = nll / math.log(2) / nbytes
  return out


# ------------------------------------------------------------------ loop

class _Preempted:
  """SIGTERM: the loop saves a checkpoint and returns cleanly. One process: a handler sets a flag.
  Many: jax's preemption service (it catches SIGTERM itself; any process may get it) names the
  step at which every process stops, so all of them save the same step together."""

  def __init__(self):
    self.flag = False
    self._old = None
    self._sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

  def __enter__(self):
    if self._sync:
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._set)
    except ValueError:  # not the main thread: no handler, no preemption support
      self._old = None
    return self

  def _set(self, *_):
    self.flag = True

  def reached(self, step: int) -> bool:
    """Whether to stop after `step`; with many processes, call it at every step."""
    if self._sync:
      from jax.experimental import multihost_utils
      self.flag = self.flag or multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def __exit__(self, *_):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict())


def make_mesh(config) -> Mesh:
  return sharding.make_mesh(dict(config.mesh))


def data_dir(config) -> str:
  return os.path.expanduser(config.data.data_dir or os.path.join("~", "tensorflow_datasets"))


def eval_sets(config, names=None) -> dict[str, list[dict]]:
  dd, tr = data_dir(config), config.train
  names = names or [n for n, w in config.data.mixture.items() if w > 0]
  return {data.domain_name(n): data.eval_batches(n, seq_len=config.data.seq_len, batch_size=tr.eval_batch_size,
                                                 num_batches=tr.eval_batches, data_dir=dd,
                                                 text_key=config.data.text_key) for n in names}


def train_iter(config, mixture=None) -> data.ShardedIterator:
  """This process's rows of the global batches: its own `data.shards` (0: one per process)."""
  dd = data_dir(config)  # local corpora are built there on first use
  return data.make_sharded_train_iter(dict(mixture or config.data.mixture), seq_len=config.data.seq_len,
                                      global_batch=config.train.batch_size,
                                      seed=config.train.seed, data_dir=dd,
                                      num_shards=config.data.get("shards", 0), process_index=jax.process_index(),
                                      process_count=jax.process_count(), text_key=config.data.text_key)


def global_data_state(it: data.ShardedIterator) -> dict:
  """The iterator state of every process's shards (each process holds only its own)."""
  state = it.get_state()
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  for row, n in zip(every, sizes):
    state["shards"].update(json.loads(bytes(row[:n]))["shards"])
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run every stage of `config` (growing at stage boundaries), resuming from `workdir`.

  Load order, in one place: this run's newest checkpoint (whatever its stage) > grow the previous
  stage's final checkpoint (if the newest one ends a stage) > scratch. Returns the final metrics.
  """
  mesh = make_mesh(config)
  stages = boundary.resolve_stages(config, model_config(config))
  tr = ml_collections.ConfigDict(config.train.to_dict())
  tr.steps = stages[-1].end  # one schedule over all stages; the Adam count carries through growth
  book = Logbook(workdir, tr.steps)
  mixtures = [dict(st.mixture or config.data.mixture) for st in stages]
  domains = list(dict.fromkeys(n for m in mixtures for n, w in m.items() if w > 0))
  evals = eval_sets(config, domains)
  held = {d: b[0] for d, b in evals.items()}
  at_stage, at_step = boundary.latest(workdir, stages, tr)
  budget = tr.get("stop_after_steps", 0) or None
  result: dict[str, Any] = {}
  for st in stages:
    if st.index < at_stage or (st.index == at_stage and at_step >= st.end and st.index < len(stages) - 1):
      continue  # finished earlier (a finished stage's successor grows from its checkpoint below)
    program = build_program(st.cfg, tr, mesh)
    mngr = boundary.manager(workdir, st.index, tr)
    it = train_iter(config, mixtures[st.index])
    try:
      if st.index == at_stage:
        state, meta, data_state = checkpoint.restore(mngr, at_step, program.abstract_state)
        if checkpoint.model_config(meta) != st.cfg:
          raise ValueError(f"checkpoint {checkpoint.step_dir(mngr, at_step)} holds a different model than stage "
                           f"{st.index} of the config: {boundary.config_diff(checkpoint.model_config(meta), st.cfg)}")
        book.say(f"resumed from {checkpoint.step_dir(mngr, at_step)} at step {at_step} (stage {st.index}: {st.name})")
      elif st.index == 0:
        state, data_state = program.init(jax.random.key(tr.seed)), None
        meta = {"model": st.cfg.to_dict(), "stage": 0, "lineage": [{"stage": 0, "name": st.name, "step": 0, "ops": []}]}
      else:
        src = boundary.manager(workdir, st.index - 1, tr, read_only=True)
        state, data_state, cert = boundary.grow_checkpoint(
            src, src.latest_step(), st, tr, mesh, build_program, held, mngr, workdir,
            jax.random.fold_in(jax.random.key(tr.seed), 1000 + st.index))
        src.close()
        book.say(boundary.certificate_text(cert))
        meta = checkpoint.read_meta(mngr, int(state["step"]))
        result.setdefault("certificates", []).append(cert)
        if mixtures[st.index] != mixtures[st.index - 1]:
          data_state = None  # a new mixture starts its own stream
      if data_state is not None:
        it.set_state(data_state)
      begin = int(state["step"])
      stop = st.end if budget is None else min(st.end, begin + budget)
      out = run_loop(program, state, it, mngr, book, evals, meta, tr, end=stop, stage_name=st.name)
    finally:  # also on errors: finish in-flight async saves so the last good checkpoint is whole
      mngr.wait_until_finished()
      mngr.close()
    result.update({k: v for k, v in out.items() if k != "certificates"}, stage=st.index)
    if budget is not None:
      budget -= out["step"] - begin
    if out["preempted"] or out["step"] < st.end:
      result["stopped_early"] = not out["preempted"]
      break
  book.close()
  result.setdefault("stopped_early", False)
  return result


def run_loop(program, state, it, mngr, book, evals, meta, tr, end: int, stage_name: str = "") -> dict[str, Any]:
  """Train from `state['step']` to global step `end`: checkpoints every `checkpoint_every`, at
  `end` and on SIGTERM; evaluates every `eval_every` and at `end`."""
  start = int(state["step"])
  last_saved = mngr.latest_step()
  step, prev, t_log, tok = start, None, time.perf_counter(), 0
  result: dict[str, Any] = {"step": start, "preempted": False}
  stop = end
  with _Preempted() as pre:
    while step < stop:
      local = next(it)
      batch = to_global(program, local)
      state, metrics = program.train_step(state, batch)
      tok += batch["inputs"].size
      if prev is not None:  # check the previous step's loss: keeps dispatch one step ahead
        _check_finite(prev, step, mngr, last_saved)
      step, prev = step + 1, (metrics["loss"], step + 1)
      if step % tr.log_every == 0 or step == tr.steps:
        loss = float(metrics["loss"])
        _check_finite((metrics["loss"], step), step, mngr, last_saved)
        dt = time.perf_counter() - t_log
        row = flatten_metrics(jax.device_get(metrics))
        row["tokens_per_s"] = tok / dt
        book.write(step, row)
        book.progress(step, loss, tok / dt, start, stage_name)
        t_log, tok = time.perf_counter(), 0
        result.update(loss=loss, tokens_per_s=row["tokens_per_s"])
      if tr.eval_every and (step % tr.eval_every == 0 or step == stop):
        ev = evaluate(program, state["params"], evals)
        book.write(step, ev)
        result.update(ev)
      preempted = pre.reached(step)
      if preempted or step % tr.checkpoint_every == 0 or step == stop:
        checkpoint.save(mngr, step, state, meta, global_data_state(it))
        last_saved = step
      if preempted:
        mngr.wait_until_finished()
        book.say(f"SIGTERM: saved checkpoint {checkpoint.step_dir(mngr, step)} at step {step}; exiting")
        result["preempted"] = True
        break
  mngr.wait_until_finished()
  result["step"], result["state"] = step, state
  if not result["preempted"] and any(k.startswith("eval/") for k in result):
    rows = [{"domain": d, "loss": result.get(f"eval/{d}/loss", float("nan")),
             "bits/byte": result.get(f"eval/{d}/bpb", float("nan"))} for d in evals]
    if jax.process_index() == 0:
      print_table(rows, ["domain", "loss", "bits/byte"])
  return result


def _check_finite(loss_and_step, step, mngr, last_saved):
  loss, at = loss_and_step
  v = float(loss)
  if not math.isfinite(v):
    where = checkpoint.step_dir(mngr, last_saved) if last_saved is not None else "none (no checkpoint yet)"
    raise FloatingPointError(f"loss is {v} at step {at}; stopping. Last good checkpoint: {where}")
