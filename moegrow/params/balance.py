"""Auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).

With `ModelConfig.balance="loss_free"` every MoE layer holds a per-expert bias
`params['blocks'][i]['mlp']['selection_bias_E']` that is added to the routing scores for the top-k
choice only (the gates come from the unbiased scores; moegrow.model.moe.top_k_gates). It gets no
gradient and no optimizer state (`FROZEN`, frozen by moegrow.train.optim.make_optimizer): the train
step moves it after the optimizer update, from the loads f_E the step measured (eq. 4, with e the
error of an expert's load against the mean):

    b_e <- b_e + u * sign(mean_e' f_e' - f_e)        u = cfg.balance_rate

so an overloaded expert is chosen less often and an underloaded one more. The bias lives in the
params, so checkpoints carry it and a resumed run continues bit-identically.

What the growth and shrink ops do with it (docs/growth.md, "Loss-free balancing"): a new MoE layer
(upcycle, BTX, inserted blocks) starts at 0; `add_experts` gives a copy its source's bias, except
in `mode="exact"`, where a new expert gets min(b) - 1, below every old expert's score + bias, so it
is never chosen until the updates have raised it; `prune_experts` keeps the kept experts' entries;
`merge_experts` gives a group the usage-weighted mean of its members' biases; `to_dense` drops it.

Pure functions on plain dicts, like moegrow.params.ramp.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from moegrow.config import ModelConfig

LEAF = "selection_bias_E"
FROZEN = rf"^blocks/\d+/mlp/{LEAF}$"  # never trained: the train step moves it (`advance`)


def active(cfg: ModelConfig) -> bool:
  """Whether `cfg`'s MoE layers carry a selection bias."""
  return cfg.balance == "loss_free" and bool(cfg.moe_layer_ids)


def update(bias_E, load_E, rate: float):
  """One step of eq. 4: b + u * sign(mean(load) - load), in float32."""
  load_E = jnp.asarray(load_E, jnp.float32)
  return (bias_E + jnp.float32(rate) * jnp.sign(jnp.mean(load_E) - load_E)).astype(bias_E.dtype)


def advance(params: Mapping, loads: Mapping, cfg: ModelConfig) -> dict:
  """`params` with every MoE layer's selection bias moved one step by that layer's measured load
  `loads[str(layer)]` (the train step's metrics['moe'][layer]['load']); unchanged without
  loss-free balancing."""
  if not active(cfg):
    return dict(params)
  blocks = dict(params["blocks"])
  for i in cfg.moe_layer_ids:
    mlp = dict(blocks[str(i)]["mlp"])
    mlp[LEAF] = update(mlp[LEAF], loads[str(i)]["load"], cfg.balance_rate)
    blocks[str(i)] = {**blocks[str(i)], "mlp": mlp}
  return {**params, "blocks": blocks}
