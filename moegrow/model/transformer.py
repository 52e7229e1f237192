"""Decoder-only transformer LM and its pure-dict functional interface.

Shape letters: docs/letters.md (B batch, T length, D model width, V vocab).

Everything outside this module (checkpoints, growth, training) sees parameters as plain
nested dicts with string keys, e.g. `params["blocks"]["3"]["mlp"]["wact_EDF"]`:
  init_params(cfg, seed) -> params      apply(cfg, params, tokens_BT) -> (logits_BTV, aux)
  logical_axes(cfg) -> same tree of logical-axis tuples;   abstract_params(cfg) -> ShapeDtypeStructs
With cfg.lora_rank > 0 the params also hold LoRA adapters under params['lora'] (moegrow.params.lora);
`apply` folds them into the weights before the layers run, so the kernels are unchanged. With
cfg.ramps (ramped growth, moegrow.params.ramp) the params hold the ramps' masks under params['ramp']
(float32 scalars); `apply` masks the ramped slices the same way, after the adapters.
cfg.remat ("none", "block", "dots") rematerialises each Block's forward in the backward (`Block`).
"""
from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from flax import nnx

from moegrow.config import ModelConfig
from moegrow.model.layers import Attention, Mlp, RMSNorm, param
from moegrow.model.moe import MoeMlp
from moegrow.params import lora, ramp
from moegrow.params.trees import check_tree, to_plain
from moegrow.sharding import constrain


# cfg.remat -> what a block's forward keeps for the backward (None: everything, no remat).
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's inputs; all recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs; the rest recomputed
}


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). With cfg.remat "block" or "dots"
  the block's forward runs under `nnx.remat` (jax.checkpoint) with that policy, so the backward
  recomputes what the policy does not save."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, dt, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    e = cfg.experts_in_layer(layer)
    self.mlp = MoeMlp(cfg, e, rngs) if e else Mlp(cfg.d_model, cfg.d_ff, cfg.mlp_act, dt, rngs)
    self.remat = cfg.remat

  def __call__(self, x_BTD, positions_BT, rng=None):
    """(block output, MoE metrics or None, the MLP's input h_BTD)."""
    if self.remat == "none":
      return self.forward(x_BTD, positions_BT, rng)
    return nnx.remat(Block.forward, policy=REMAT_POLICIES[self.remat])(self, x_BTD, positions_BT, rng)

  def forward(self, x_BTD, positions_BT, rng=None):
    """The block's computation (`__call__` without remat)."""
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT)
    h_BTD = self.mlp_norm(x_BTD)
    if isinstance(self.mlp, MoeMlp):
      y_BTD, metrics = self.mlp(h_BTD, rng)
    else:
      y_BTD, metrics = self.mlp(h_BTD), None
    return constrain(x_BTD + y_BTD, ("batch", "length", "act_embed")), metrics, h_BTD


class TransformerLM(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_VD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=1.0)
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.head_DV = None if cfg.tie_embeddings else param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def __call__(self, tokens_BT, rng: jax.Array | None = None, mlp_inputs: bool = False):
    """Logits [B, T, V] and aux: weighted MoE `loss` to add to the LM loss, raw sums, per-layer
    metrics, and with `mlp_inputs` each layer's MLP input {layer: h_BTD} (routing probes)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(dt)
    x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    period = scan_period(cfg) if cfg.scan_layers else 0
    if period:
      x_BTD, layers, inputs = self._scanned(x_BTD, positions_BT, rng, period, mlp_inputs)
    else:
      layers, inputs = {}, {}
      for i, block in enumerate(self.blocks):
        key = None if rng is None else jax.random.fold_in(rng, i)
        x_BTD, metrics, inputs[str(i)] = block(x_BTD, positions_BT, key)
        if metrics is not None:
          layers[str(i)] = metrics
    x_BTD = self.final_norm(x_BTD)
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    if self.head_DV is None:  # tied: logits = x E^T (scaled so init logits are O(1), unless HF-style)
      logits_NV = x_ND @ self.embed_VD[...].astype(dt).T
      if cfg.tied_logit_scale:
        logits_NV = logits_NV / jnp.sqrt(cfg.d_model).astype(dt)
    else:
      logits_NV = x_ND @ self.head_DV[...].astype(dt)
    logits_BTV = constrain(logits_NV.astype(jnp.float32).reshape(b, t, -1), ("batch", "length", "vocab"))
    aux_sum = sum((m["aux_loss"] for m in layers.values()), jnp.zeros((), jnp.float32))
    z_sum = sum((m["z_loss"] for m in layers.values()), jnp.zeros((), jnp.float32))
    seq_sum = sum((m["seq_aux_loss"] for m in layers.values()), jnp.zeros((), jnp.float32))
    aux = {"loss": cfg.aux_loss_weight * aux_sum + cfg.z_loss_weight * z_sum + cfg.seq_aux_loss_weight * seq_sum,
           "aux_loss": aux_sum, "z_loss": z_sum, "layers": layers}
    if mlp_inputs:
      aux["mlp_inputs"] = inputs
    return logits_BTV, aux


  def _scanned(self, x_BTD, positions_BT, rng, period: int, mlp_inputs: bool):
    """The blocks as one `jax.lax.scan` over R = L / period repetitions of `period` blocks: the
    blocks' params are stacked inside the step (the params tree keeps one entry per layer, so
    checkpoints and growth ops see no difference), and XLA compiles one repetition instead of L
    blocks. Same maths as the loop, layer by layer (the same per-layer rng keys)."""
    n = len(self.blocks)
    splits = [nnx.split(b) for b in self.blocks]
    stacked = [jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[splits[r * period + j][1]
                                                                   for r in range(n // period)])
               for j in range(period)]

    def body(x_BTD, xs):
      states, r = xs
      metrics, inputs = [], []
      for j in range(period):
        block = nnx.merge(splits[j][0], states[j])
        key = None if rng is None else jax.random.fold_in(rng, r * period + j)
        x_BTD, m, h_BTD = block(x_BTD, positions_BT, key)
        metrics.append(m)
        inputs.append(h_BTD if mlp_inputs else None)
      return x_BTD, (metrics, inputs)
    x_BTD, (metrics, inputs) = jax.lax.scan(body, x_BTD, (stacked, jnp.arange(n // period)))
    layers, hs = {}, {}
    for r in range(n // period):
      for j in range(period):
        i = str(r * period + j)
        if metrics[j] is not None:
          layers[i] = jax.tree_util.tree_map(lambda a, r=r: a[r], metrics[j])
        hs[i] = None if inputs[j] is None else inputs[j][r]
    return x_BTD, layers, hs


def scan_period(cfg: ModelConfig) -> int:
  """The smallest period p (1, 2, ...) with which the layers' kinds (dense, or MoE with E experts)
  repeat, if the model has at least two repetitions; 0 otherwise (the blocks run as a loop)."""
  kinds = [cfg.experts_in_layer(i) for i in range(cfg.num_layers)]
  for p in range(1, cfg.num_layers // 2 + 1):
    if cfg.num_layers % p == 0 and all(kinds[i] == kinds[i % p] for i in range(cfg.num_layers)):
      return p
  return 0


# ---------------------------------------------------------------- pure-dict interface

def base_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` without its LoRA adapters and ramps (the layers' own config)."""
  if cfg.lora_rank:
    cfg = cfg.replace(lora_rank=0, lora_alpha=16.0, lora_targets=ModelConfig.lora_targets)
  return ramp.strip(cfg)


@functools.lru_cache(maxsize=64)
def _graph(cfg: ModelConfig):
  """GraphDef and abstract nnx.State of `cfg` (no FLOPs, no memory)."""
  if cfg.lora_rank or cfg.ramps:
    return _graph(base_config(cfg))
  abstract = nnx.eval_shape(lambda: TransformerLM(cfg, nnx.Rngs(0)))
  return nnx.split(abstract)


def _state_from(cfg: ModelConfig, params: dict):
  graphdef, state = _graph(cfg)
  state = jax.tree_util.tree_map(lambda x: x, state)  # private copy
  check_tree(params, abstract_params(cfg), "params", check_dtype=False)

  def keyed(template, given):  # the model's own key types (ints under nnx.List)
    if isinstance(template, dict):
      return {k: keyed(v, given[str(k)]) for k, v in template.items()}
    return given

  nnx.replace_by_pure_dict(state, keyed(nnx.to_pure_dict(state), params))
  return graphdef, state


def model_from_params(cfg: ModelConfig, params: dict) -> TransformerLM:
  """NNX model whose parameters are `params` (validated: exact keys and shapes); LoRA adapters,
  if any, folded into the weights, then ramp masks, if any, applied (`fold_ramps`)."""
  if cfg.lora_rank:
    params = fold_lora(cfg, params)
  if cfg.ramps:
    params = fold_ramps(cfg, params)
  return nnx.merge(*_state_from(base_config(cfg), params))


def fold_ramps(cfg: ModelConfig, params: dict) -> dict:
  """The params with every ramp mask params['ramp'] applied to its slices (moegrow.params.ramp.apply):
  the effective weights the layers run on, without 'ramp'."""
  if ramp.KEY not in params:
    raise ValueError(f"params have no '{ramp.KEY}' masks but the model has ramps {ramp.names(cfg)}")
  return ramp.apply(params, cfg)


def fold_lora(cfg: ModelConfig, params: dict) -> dict:
  """The base params with the adapters params['lora'] folded in (W + (alpha / r) A B)."""
  if "lora" not in params:
    raise ValueError(f"params have no 'lora' adapters but the model has lora_rank={cfg.lora_rank}")
  return lora.apply({k: v for k, v in params.items() if k != "lora"}, params["lora"], cfg.lora_alpha)


def params_of(model: TransformerLM) -> dict:
  return to_plain(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def init_params(cfg: ModelConfig, seed: int | jax.Array = 0) -> dict:
  rngs = nnx.Rngs(seed)
  params = params_of(TransformerLM(base_config(cfg), rngs))
  if cfg.lora_rank:
    key = jax.random.fold_in(seed if isinstance(seed, jax.Array) else jax.random.key(seed), 0x10A)
    params["lora"] = lora.init(params, rank=cfg.lora_rank, key=key, patterns=cfg.lora_targets)
  if cfg.ramps:
    ramp.check(params, cfg)
    params[ramp.KEY] = ramp.init(cfg)  # m = 0: the new units start switched off
  return params


def apply(cfg: ModelConfig, params: dict, tokens_BT, rng: jax.Array | None = None, mlp_inputs: bool = False):
  """Pure forward: (logits_BTV float32, aux). Safe under jax.jit / grad."""
  return model_from_params(cfg, params)(tokens_BT, rng, mlp_inputs)


def abstract_params(cfg: ModelConfig) -> dict:
  out = to_plain(nnx.to_pure_dict(_graph(cfg)[1]))
  if cfg.lora_rank:
    out["lora"] = lora.abstract(out, rank=cfg.lora_rank, patterns=cfg.lora_targets)
  if cfg.ramps:
    ramp.check(out, cfg)
    out[ramp.KEY] = ramp.abstract(cfg)
  return out


def logical_axes(cfg: ModelConfig) -> dict:
  """Tree of logical-axis tuples, same structure as the params."""
  state = _graph(cfg)[1]
  axes = jax.tree_util.tree_map(lambda v: v.get_metadata()["logical_axes"], state,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
  out = to_plain(axes, sequences=False)
  if cfg.lora_rank:
    out["lora"] = lora.logical_axes(abstract_params(base_config(cfg)), out, cfg.lora_targets)
  if cfg.ramps:
    out[ramp.KEY] = ramp.logical_axes(cfg)  # scalars, replicated
  return out
