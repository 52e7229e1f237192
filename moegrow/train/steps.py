"""Compiled train and eval steps for one model config on one mesh (`Program`).

State is a plain dict `{'params', 'opt_state', 'step'}`; every jitted function names its in/out
shardings, so the same code runs on 1 CPU device, 8 simulated ones or a TPU pod.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moegrow import sharding
from moegrow.config import ModelConfig
from moegrow.data import PAD_ID
from moegrow.model import transformer as tf
from moegrow.train import optim

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
  all_finite: Callable  # params -> bool scalar: every parameter finite


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
  schedule = optim.schedule_from(train_cfg)
  tx = optim.make_optimizer(train_cfg, tf.abstract_params(cfg), schedule)
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
    mask = (batch["targets"] != PAD_ID).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)

  batch_tree = {"inputs": batch_sh, "targets": batch_sh}
  replicated = NamedSharding(mesh, P())  # metrics: readable on every process
  return Program(
      cfg=cfg, mesh=mesh, tx=tx, schedule=schedule, abstract_state=abstract, state_sharding=sh,
      batch_sharding=batch_sh,
      init=jax.jit(init, out_shardings=sh),
      train_step=jax.jit(train_step, in_shardings=(sh, batch_tree), out_shardings=(sh, replicated),
                         donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(sh["params"], batch_tree), out_shardings=replicated),
      all_finite=jax.jit(all_finite, in_shardings=(sh["params"],), out_shardings=replicated))


def all_finite(tree) -> jax.Array:
  """True when every leaf of `tree` is finite (one fused reduction, cheap next to a step)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def to_global(program: Program, local: dict) -> dict:
  """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
  out = {}
  for k in ("inputs", "targets"):
    x = np.asarray(local[k])
    shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    out[k] = jax.make_array_from_process_local_data(program.batch_sharding, x, shape)
  return out

