"""Compiled train and eval steps for one model config on one mesh (`Program`).

State is a plain dict `{'params', 'opt_state', 'step'}`; every jitted function names its in/out
shardings, so the same code runs on 1 CPU device, 8 simulated ones or a TPU pod.

A continual-learning `Objective` adds terms to the loss in the same jitted step: an EWC penalty
(Fisher and anchor passed in `ctx['ewc']`) and distillation from a frozen teacher (its params in
`ctx['teacher']`, sharded by the teacher's own model config). The step is then
`train_step(state, batch, ctx)`; with no objective it is `train_step(state, batch)`.

A model with ramps (ramped growth, `moegrow.params.ramp`) keeps their masks in params['ramp']: they get no
gradient and no optimizer state (`optim.make_optimizer` freezes them), and every train step
advances them after the optimizer update (m <- min(1, m + 1/N)). They are saved with the params,
so a run resumed mid-ramp continues bit-identically. Loss-free balancing's selection biases
(`moegrow.params.balance`) are handled the same way: frozen for the optimizer, moved by the step
from the loads it measured.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moegrow import sharding
from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.params import balance, ramp
from moegrow.train import continual, optim

@dataclasses.dataclass(frozen=True)
class Objective:
  """Loss terms against forgetting (all off by default; see moegrow.train.continual).

  ewc_weight: w in the EWC penalty w/2 sum F (theta - theta*)^2 (needs ctx['ewc']).
  distill_weight (a), temperature (T): loss (1 - a) CE + a T^2 KL(teacher_T || student_T) per token.
  distill_replay_only: distil only on rows of replayed domains (the batch's 'replay' row mask).
  teacher_cfg: the teacher's model config (the pre-growth model); needed when distill_weight > 0.
  """
  ewc_weight: float = 0.0
  distill_weight: float = 0.0
  temperature: float = 1.0
  distill_replay_only: bool = False
  teacher_cfg: ModelConfig | None = None

  @property
  def active(self) -> bool:
    return self.ewc_weight > 0 or self.distill_weight > 0


def lm_loss(cfg: ModelConfig, params, batch, rng=None, objective: Objective | None = None, ctx=None):
  """Mean next-token cross-entropy + the model's weighted MoE losses (+ the objective's terms)."""
  logits_BTV, aux = tf.apply(cfg, params, batch["inputs"], rng)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
  ce = ce_BT.mean()
  moe = {i: {k: m[k] for k in ("load", "dropped", "router_entropy")} for i, m in aux["layers"].items()}
  metrics = {"ce": ce, "aux_loss": aux["aux_loss"], "z_loss": aux["z_loss"], "moe": moe}
  task = ce
  if objective is not None and objective.distill_weight > 0:
    teacher_BTV, _ = tf.apply(objective.teacher_cfg, jax.lax.stop_gradient(ctx["teacher"]), batch["inputs"])
    kl_BT = continual.distill_kl(teacher_BTV, logits_BTV, objective.temperature)
    weight_BT = jnp.full(ce_BT.shape, objective.distill_weight, jnp.float32)
    if objective.distill_replay_only:
      weight_BT = weight_BT * batch["replay"][:, None]
    t2 = objective.temperature ** 2
    task = jnp.mean((1.0 - weight_BT) * ce_BT + weight_BT * t2 * kl_BT)  # Hinton et al. 2015, sec. 2
    metrics["distill_kl"] = jnp.sum(kl_BT * (weight_BT > 0)) / jnp.maximum(jnp.sum(weight_BT > 0), 1)
  loss = task + aux["loss"]
  if objective is not None and objective.ewc_weight > 0:
    metrics["ewc_penalty"] = continual.ewc_penalty(params, ctx["ewc"]["fisher"], ctx["ewc"]["anchor"],
                                                   objective.ewc_weight)
    loss = loss + metrics["ewc_penalty"]
  return loss, metrics


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
  train_step: Callable  # (state, batch[, ctx]) -> (state, metrics); a SeededStep
  eval_step: Callable  # (params, batch) -> (sum_nll, count)
  all_finite: Callable  # params -> bool scalar: every parameter finite
  objective: Objective | None = None
  ctx_sharding: Any = None  # shardings of the train step's `ctx` (None: no ctx)
  batch_keys: tuple = ("inputs", "targets")


@dataclasses.dataclass(frozen=True)
class SeededStep:
  """A compiled train step whose rng seed is an argument, not a constant baked into the program:
  runs that differ only in their seed (a figure's seeds) share one compilation, in memory and in
  the persistent compilation cache. Called like the step itself: (state, batch[, ctx])."""
  step: Callable  # jitted (state, batch, seed, ctx=None) -> (state, metrics)
  seed: int  # the train config's seed + 1, passed as a uint32 scalar
  sharding: NamedSharding  # replicated on the program's mesh
  _on_device: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def device_seed(self) -> jax.Array:
    """The seed on the mesh, put there at the first call (a compile-only mesh never needs it)."""
    if "seed" not in self._on_device:
      self._on_device["seed"] = jax.device_put(np.asarray(self.seed, np.uint32), self.sharding)
    return self._on_device["seed"]

  def __call__(self, state, batch, ctx=None):
    seed = self.device_seed()
    return self.step(state, batch, seed) if ctx is None else self.step(state, batch, seed, ctx)

  def lower(self, state, batch, ctx=None):
    """The lowered step, seed bound: `.compile()` gives a step called as (state, batch[, ctx])."""
    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=self.sharding)
    args = (state, batch, seed) if ctx is None else (state, batch, seed, ctx)
    return _SeedBound(self.step.lower(*args), self.device_seed)


class _SeedBound:
  """A lowered or compiled train step with its seed bound (`seed()` gives it when called); every
  other attribute (as_text, memory_analysis, cost_analysis, ...) is the wrapped object's."""

  def __init__(self, inner, seed: Callable[[], jax.Array]):
    self._inner, self._seed = inner, seed

  def compile(self, *args, **kw):
    return _SeedBound(self._inner.compile(*args, **kw), self._seed)

  def __call__(self, state, batch, ctx=None):
    seed = self._seed()
    return self._inner(state, batch, seed) if ctx is None else self._inner(state, batch, seed, ctx)

  def __getattr__(self, name):
    return getattr(self._inner, name)


def state_shardings(cfg: ModelConfig, tx, mesh: Mesh):
  """(abstract state with shardings, sharding tree) for params, optimizer state and step."""
  params = tf.abstract_params(cfg)
  p_sh = sharding.tree_shardings(tf.logical_axes(cfg), mesh, params)
  opt = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, P())
  by_path = {"/".join(str(k.key) for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(p_sh)[0]}

  def opt_sharding(path, leaf):  # a moment is sharded like its parameter (named by its trailing dict keys)
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(str(k.key))
    s = by_path.get("/".join(reversed(keys)))
    return s if s is not None and getattr(leaf, "shape", None) == params_shape.get("/".join(reversed(keys))) \
        else replicated
  params_shape = {"/".join(str(k.key) for k in path): x.shape
                  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  o_sh = jax.tree_util.tree_map_with_path(opt_sharding, opt)  # frozen leaves (MaskedNode) have none
  sh = {"params": p_sh, "opt_state": o_sh, "step": replicated}
  shapes = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
  abstract = jax.tree_util.tree_map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, sh)
  return abstract, sh


def params_sharding(cfg: ModelConfig, mesh: Mesh):
  """The shardings of `cfg`'s params on `mesh` (as the train state holds them)."""
  return sharding.tree_shardings(tf.logical_axes(cfg), mesh, tf.abstract_params(cfg))


_PROGRAMS: "collections.OrderedDict[Any, Program]" = collections.OrderedDict()
# The train-config fields a Program is built from (optimizer, schedule, frozen slices, the step's
# rng seed, gradient accumulation; the seed is the step's argument, so it selects a Program but
# not a compilation); the others (logging, evaluation and checkpoint cadence, stop
# steps, ...) never reach the compiled steps, so changing them reuses the program.
PROGRAM_FIELDS = ("lr", "steps", "warmup_steps", "schedule", "min_lr_ratio", "b1", "b2", "weight_decay",
                  "grad_clip", "frozen", "seed", "microbatches")


def program_fields(train_cfg) -> dict:
  """The part of a train config that its Program depends on (PROGRAM_FIELDS)."""
  d = train_cfg.to_dict() if hasattr(train_cfg, "to_dict") else dict(train_cfg)
  return {k: d.get(k) for k in PROGRAM_FIELDS}


_MAX_PROGRAMS = 8


def build_program(cfg: ModelConfig, train_cfg, mesh: Mesh, objective: Objective | None = None) -> Program:
  """The `Program` of (model, train config, mesh, objective). Programs are immutable; the last
  few built are kept, so a stage boundary that needs the previous stage's program again (growth,
  a teacher) or a resumed stage reuses its compiled steps instead of compiling them again."""
  fields = program_fields(train_cfg)
  seed = int(fields.pop("seed"))
  train = json.dumps(fields, sort_keys=True, default=str)
  compiled_key = (cfg, train, mesh, objective if objective is not None and objective.active else None)
  key = (compiled_key, seed)
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]
  same = next((p for (k, _), p in reversed(_PROGRAMS.items()) if k == compiled_key), None)
  if same is None:
    same = _build_program(cfg, train_cfg, mesh, objective)
  program = dataclasses.replace(same, train_step=SeededStep(same.train_step.step, seed + 1, NamedSharding(mesh, P())))
  _PROGRAMS[key] = program
  while len(_PROGRAMS) > _MAX_PROGRAMS:
    _PROGRAMS.popitem(last=False)
  return program


def _build_program(cfg: ModelConfig, train_cfg, mesh: Mesh, objective: Objective | None = None) -> Program:
  """A new `Program` (its steps jitted, not yet compiled); `build_program` keeps the last few."""
  schedule = optim.schedule_from(train_cfg)
  tx = optim.make_optimizer(train_cfg, tf.abstract_params(cfg), schedule)
  abstract, sh = state_shardings(cfg, tx, mesh)
  batch_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), mesh=mesh))
  row_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh=mesh))
  objective = objective if objective is not None and objective.active else None
  ctx_sh = _ctx_shardings(objective, sh["params"], mesh)

  def init(key):
    params = tf.init_params(cfg, key)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  microbatches = int(train_cfg.get("microbatches", 1) or 1)
  train_step = _train_step_fn(cfg, tx, schedule, mesh, _loss_and_grads_fn(cfg, objective, microbatches))
  batch_tree = {"inputs": batch_sh, "targets": batch_sh}
  eval_tree = dict(batch_tree)
  if objective is not None and objective.distill_replay_only:
    batch_tree["replay"] = row_sh
  replicated = NamedSharding(mesh, P())  # metrics: readable on every process
  in_sh = (sh, batch_tree, replicated) if ctx_sh is None else (sh, batch_tree, replicated, ctx_sh)
  return Program(
      cfg=cfg, mesh=mesh, tx=tx, schedule=schedule, abstract_state=abstract, state_sharding=sh,
      batch_sharding=batch_sh, objective=objective, ctx_sharding=ctx_sh, batch_keys=tuple(batch_tree),
      init=jax.jit(init, out_shardings=sh),
      train_step=SeededStep(jax.jit(train_step, in_shardings=in_sh, out_shardings=(sh, replicated), donate_argnums=0),
                            int(train_cfg.seed) + 1, replicated),
      eval_step=jax.jit(_eval_step_fn(cfg, mesh), in_shardings=(sh["params"], eval_tree), out_shardings=replicated),
      all_finite=jax.jit(all_finite, in_shardings=(sh["params"],), out_shardings=replicated))


def _ctx_shardings(objective: Objective | None, params_sh, mesh: Mesh) -> dict | None:
  """The shardings of the train step's `ctx` for an active objective (EWC's Fisher and anchor like
  the params, the teacher like its own model's params); None without one."""
  if objective is None:
    return None
  if objective.distill_weight > 0 and objective.teacher_cfg is None:
    raise ValueError("Objective: distill_weight > 0 needs the teacher's model config (teacher_cfg)")
  ctx_sh = {}
  if objective.ewc_weight > 0:
    ctx_sh["ewc"] = {"fisher": params_sh, "anchor": params_sh}
  if objective.distill_weight > 0:
    ctx_sh["teacher"] = params_sharding(objective.teacher_cfg, mesh)
  return ctx_sh


def _loss_and_grads_fn(cfg: ModelConfig, objective: Objective | None, microbatches: int) -> Callable:
  """(params, batch, rng, ctx) -> ((loss, metrics), grads) of `lm_loss`, accumulated over
  `microbatches` when there are several."""

  def grads_of(params, batch, rng, ctx):
    grad_fn = jax.value_and_grad(lambda p: lm_loss(cfg, p, batch, rng, objective, ctx), has_aux=True)
    return grad_fn(params)

  def accumulated(params, batch, rng, ctx):
    """Gradient accumulation: the batch's rows i, i + mb, i + 2 mb, ... form microbatch i (so each
    one stays spread over every data shard); gradients and metrics are their means."""
    split = lambda x: sharding.constrain(
        jnp.swapaxes(x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]), 0, 1),
        (None, "batch") + (None,) * (x.ndim - 1))
    parts = jax.tree_util.tree_map(split, batch)

    def body(acc, xs):
      i, part = xs
      (loss, aux), g = grads_of(params, part, jax.random.fold_in(rng, i), ctx)
      return jax.tree_util.tree_map(jnp.add, acc, g), (loss, aux)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    grads, (loss, aux) = jax.lax.scan(body, zeros, (jnp.arange(microbatches), parts))
    mean = lambda t: jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), t)
    return (jnp.mean(loss), mean(aux)), jax.tree_util.tree_map(lambda g: g / microbatches, grads)

  return accumulated if microbatches > 1 else grads_of


def _train_step_fn(cfg: ModelConfig, tx, schedule, mesh: Mesh, loss_and_grads: Callable) -> Callable:
  """The train step (state, batch, seed, ctx=None) -> (state, metrics): gradients, the optimizer
  update, the ramps' masks and the loss-free selection biases advanced."""

  def train_step(state, batch, seed, ctx=None):  # seed: uint32 scalar (the train config's seed + 1)
    with sharding.use_mesh(mesh):
      rng = jax.random.fold_in(jax.random.key(seed), state["step"])
      (loss, aux), grads = loss_and_grads(state["params"], batch, rng, ctx)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      params = ramp.advance(params, cfg)  # the masks move one step (no-op without ramps)
      params = balance.advance(params, aux["moe"], cfg)  # no-op without loss-free balancing
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics
  return train_step


def _eval_step_fn(cfg: ModelConfig, mesh: Mesh) -> Callable:
  """The eval step (params, batch) -> (summed next-token NLL, number of targets)."""

  def eval_step(params, batch):
    with sharding.use_mesh(mesh):
      logits, _ = tf.apply(cfg, params, batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)  # packed rows: every target counts
  return eval_step


def all_finite(tree) -> jax.Array:
  """True when every leaf of `tree` is finite (one fused reduction, cheap next to a step)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def to_global(program: Program, local: dict) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the batch axes (the keys the
  program's train step takes: inputs, targets and, for replay-only distillation, 'replay')."""
  out = {}
  for k in program.batch_keys:
    if k not in local:
      raise KeyError(f"batch has no {k!r} (keys: {sorted(local)}); the train step needs it")
    x = np.asarray(local[k])
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    sh = program.batch_sharding if x.ndim > 1 else NamedSharding(
        program.mesh, sharding.logical_to_spec(("batch",), mesh=program.mesh))
    out[k] = jax.make_array_from_process_local_data(sh, x, shape)
  return out

