"""Mixture-of-experts MLP: float32 router, top-k token choice, stacked experts.

Shape letters (docs/letters.md): B batch, T length, D model width, F expert hidden, E experts,
K experts per token, C capacity per expert per sequence, Q = B*C capacity slots of one expert,
N = B*T tokens, M = N*K token-expert assignments, J = K*T assignments of one sequence, P rows of
a dispatch buffer (sorted or capacity-slotted assignments, plus padding).

Routing (Shazeer et al. 2017; Fedus et al. 2022; Zoph et al. 2022; DeepSeek-V3 2024):
  softmax_topk:  g = top_k(softmax(z))            (weights not renormalised; Switch/GShard)
  topk_softmax:  g = softmax(top_k(z))            (renormalised over the chosen k; Mixtral)
  sigmoid_topk:  s = sigmoid(z), g = s_K / sum s_K (renormalised over the chosen k; DeepSeek-V3)
Loss-free balancing (cfg.balance="loss_free"; Wang et al. 2024, arXiv 2408.15664, eq. 3): a
per-expert bias b_E (`selection_bias_E`, moved by the train step: moegrow.params.balance) is added
to the selection scores (softmax_topk: probabilities; topk_softmax: logits; sigmoid_topk: sigmoid
scores) for the top-k choice only; the gates come from the unbiased scores.
Dispatch:
  capacity: each sequence gives expert e at most C = ceil(K*T/E * capacity_factor) slots,
            top-1 choices first (GShard priority); assignments beyond C are dropped.
  dropless: every assignment is computed. "blocks" (CPU default): sort by expert, then one fused
            expert FFN that loops over experts and blocks of their rows (moegrow.grouped_ffn).
            "ragged_dot" (TPU/GPU default): jax.lax.ragged_dot; on XLA:CPU it lowers to a
            masked dense product with E times the FLOPs.
On a mesh the routed part runs under shard_map: every device routes its own tokens. With an
`expert` mesh axis that divides E, each device holds only E / ne experts and tokens travel to
them: capacity buffers by all_to_all (GShard), dropless assignments by all-gather/reduce-scatter
or ragged all-to-all (moegrow.model.expert_parallel). The kernel ("auto") and the exchange follow
the platform of the mesh's devices, so a TPU program compiled ahead of time on a CPU host uses
the TPU kernels.
"""
from __future__ import annotations

import logging
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from moegrow.config import ModelConfig, fan_in_std
from moegrow.model import expert_parallel
from moegrow.model.grouped_ffn import chunk_sizes, expert_ffn, sort_by_key
from moegrow.model.layers import Mlp, activation, param
from moegrow import sharding
from moegrow.sharding import constrain


def router_losses(logits_NE, probs_NE, idx_NK, mean=lambda x: x, seqs: int = 1):
  """Switch load-balancing loss E * sum_e f_e P_e (Fedus et al. 2022, eq. 4), router z-loss
  mean(logsumexp(z)^2) (Zoph et al. 2022, eq. 5), load f_E, mean router entropy, and the
  sequence-wise balance loss: the same E * sum_e f_e P_e within each of the `seqs` sequences (the N
  tokens are `seqs` equal runs), averaged over them (DeepSeek-V3, eq. 17-20: its f_i is E f_e).
  `mean` averages over data shards (pmean inside shard_map): f and P are global means."""
  n, e = logits_NE.shape
  counts_NE = jnp.sum(jax.nn.one_hot(idx_NK, e, dtype=jnp.float32), axis=1) / idx_NK.shape[1]
  f_E = mean(jnp.mean(counts_NE, axis=0))
  p_E = mean(jnp.mean(probs_NE, axis=0))
  aux = e * jnp.sum(f_E * p_E)
  f_SE = jnp.mean(counts_NE.reshape(seqs, n // seqs, e), axis=1)
  p_SE = jnp.mean(probs_NE.reshape(seqs, n // seqs, e), axis=1)
  seq_aux = mean(e * jnp.mean(jnp.sum(f_SE * p_SE, axis=-1)))
  z = mean(jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1))))
  entropy = mean(-jnp.mean(jnp.sum(probs_NE * jnp.log(jnp.clip(probs_NE, 1e-9)), axis=-1)))
  return aux, z, f_E, entropy, seq_aux


def top_k_gates(logits_NE, k: int, gating: str, bias_E=None):
  """(probs_NE, gates_NK, idx_NK): routing probabilities (for sigmoid_topk the scores normalised
  over all experts, DeepSeek-V3 eq. 19's s'), the k gates and the chosen experts. `bias_E`
  (loss-free balancing) is added to the selection scores only; the gates ignore it."""
  bias = (lambda s: s) if bias_E is None else (lambda s: s + bias_E)
  if gating == "sigmoid_topk":
    scores_NE = jax.nn.sigmoid(logits_NE)
    _, idx_NK = jax.lax.top_k(bias(scores_NE), k)
    top_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
    gates_NK = top_NK / (jnp.sum(top_NK, axis=-1, keepdims=True) + 1e-20)  # as DeepSeek-V3's router
    return scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True), gates_NK, idx_NK
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  if gating == "softmax_topk":
    _, idx_NK = jax.lax.top_k(bias(probs_NE), k)
    gates_NK = jnp.take_along_axis(probs_NE, idx_NK, axis=-1)
  else:
    _, idx_NK = jax.lax.top_k(bias(logits_NE), k)
    gates_NK = jax.nn.softmax(jnp.take_along_axis(logits_NE, idx_NK, axis=-1), axis=-1)
  return probs_NE, gates_NK, idx_NK


def default_impl() -> str:
  """The expert FFN kernel for the platform the program is compiled for (the mesh's devices)."""
  return "blocks" if sharding.platform() == "cpu" else "ragged_dot"


def exchange_of(cfg: ModelConfig) -> str:
  """The expert-parallel exchange of dropless dispatch (moegrow.model.expert_parallel)."""
  if cfg.expert_exchange != "auto":
    return cfg.expert_exchange
  # XLA:CPU has no ragged all-to-all; nor do TPUs with limited ICI routing (v5e, v6e: "lite").
  if sharding.platform() == "cpu" or "lite" in sharding.device_kind().lower():
    return "gather"
  return "ragged"


def _combine(out_PD, rows_NK, gates_NK):
  """y_n = sum_k g_nk * out[rows_nk]; a row index P (one past the end) means dropped."""
  out_PD = jnp.concatenate([out_PD, jnp.zeros((1, out_PD.shape[1]), out_PD.dtype)])
  return jnp.einsum("NKD,NK->ND", out_PD[rows_NK], gates_NK.astype(out_PD.dtype))


def _pad_row(x_ND):
  return jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])


def _expert_ffn(w, x_EQD, act: str, impl: str):
  """Expert MLPs on a capacity buffer: row block e goes through expert e. "blocks" (CPU) runs the
  fused grouped FFN on the E equal groups (1.39x -> 1.25x a dense MLP on the benchmark layer);
  otherwise one batched einsum per weight."""
  if impl == "blocks":
    e, q, d = x_EQD.shape
    sizes = chunk_sizes(e * q, e)
    x_PD = jnp.concatenate([x_EQD.reshape(e * q, d), jnp.zeros((max(sizes), d), x_EQD.dtype)])
    y_PD = expert_ffn(x_PD, w["wact_EDF"], w.get("wlin_EDF"), w["wo_EFD"], jnp.arange(e, dtype=jnp.int32) * q,
                      jnp.full((e,), q, jnp.int32), activation(act), sizes)
    return y_PD[:e * q].reshape(e, q, d)
  h_EQF = activation(act)(jnp.einsum("EQD,EDF->EQF", x_EQD, w["wact_EDF"]))
  if w.get("wlin_EDF") is not None:
    h_EQF = h_EQF * jnp.einsum("EQD,EDF->EQF", x_EQD, w["wlin_EDF"])
  return jnp.einsum("EQF,EFD->EQD", h_EQF, w["wo_EFD"])


def _sort_by_expert(idx_NK, e: int):
  """Assignments sorted by expert: (order_M, start_E, size_E, dest_NK), where order_M lists
  flat (token, choice) indices in expert order and dest_NK is each one's sorted row."""
  order_M, start_E, size_E, dest_M = sort_by_key(idx_NK.reshape(idx_NK.size), e)
  return order_M, start_E, size_E, dest_M.reshape(idx_NK.shape)


def _take(a, i):
  return jnp.take(a, i, axis=0, mode="fill", fill_value=0)


# Sorted dispatch and combine with gather-only transposes: each token has exactly K sorted rows,
# so the transpose of the dispatch gather sums K gathered rows instead of a scatter-add (which
# XLA:CPU runs serially over a zero-filled buffer).
@partial(jax.custom_vjp, nondiff_argnums=(3,))
def permute(x_ND, order_M, dest_NK, slack: int):
  """x_PD: row j is token order_M[j] // K; `slack` zero rows after the M sorted rows."""
  token_P = jnp.concatenate([order_M // dest_NK.shape[1], jnp.full((slack,), x_ND.shape[0], jnp.int32)])
  return _take(x_ND, token_P)


def _permute_fwd(x_ND, order_M, dest_NK, slack):
  return permute(x_ND, order_M, dest_NK, slack), dest_NK


def _permute_bwd(slack, dest_NK, dx_PD):
  return jnp.sum(_take(dx_PD, dest_NK), axis=1), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute(y_PD, gates_NK, order_M, dest_NK):
  """y_n = sum_k g_nk * y_PD[dest_nk] (rows past M are ignored)."""
  return jnp.einsum("NKD,NK->ND", y_PD[dest_NK], gates_NK.astype(y_PD.dtype))


def _unpermute_fwd(y_PD, gates_NK, order_M, dest_NK):
  return unpermute(y_PD, gates_NK, order_M, dest_NK), (y_PD, gates_NK, order_M, dest_NK)


def _unpermute_bwd(res, dy_ND):
  y_PD, gates_NK, order_M, dest_NK = res
  n, k = dest_NK.shape
  slack = y_PD.shape[0] - order_M.shape[0]
  pad = jnp.full((slack,), n * k, jnp.int32)  # out of range: zero gate, zero gradient
  flat_P = jnp.concatenate([order_M, pad])
  g_P = _take(gates_NK.reshape(n * k).astype(y_PD.dtype), flat_P)
  dy_PD = _take(dy_ND, flat_P // k) * g_P[:, None]
  dg_NK = jnp.einsum("NKD,ND->NK", y_PD[dest_NK], dy_ND).astype(gates_NK.dtype)
  return dy_PD, dg_NK, None, None


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def dropless_blocks(w, x_ND, gates_NK, idx_NK, act: str):
  """Sort assignments by expert, then the fused grouped expert FFN (moegrow.grouped_ffn)."""
  e = w["wact_EDF"].shape[0]
  sizes = chunk_sizes(idx_NK.size, e)
  order_M, start_E, size_E, dest_NK = _sort_by_expert(idx_NK, e)
  x_PD = permute(x_ND, order_M, dest_NK, max(sizes))  # slack rows keep every chunk in bounds
  y_PD = expert_ffn(x_PD, w["wact_EDF"], w.get("wlin_EDF"), w["wo_EFD"], start_E, size_E, activation(act), sizes)
  return unpermute(y_PD, gates_NK, order_M, dest_NK)


def dropless_ragged(w, x_ND, gates_NK, idx_NK, act: str):
  order_M, _, g_E, dest_NK = _sort_by_expert(idx_NK, w["wact_EDF"].shape[0])
  xs_MD = permute(x_ND, order_M, dest_NK, 0)
  h_MF = activation(act)(jax.lax.ragged_dot(xs_MD, w["wact_EDF"], g_E))
  if w.get("wlin_EDF") is not None:
    h_MF = h_MF * jax.lax.ragged_dot(xs_MD, w["wlin_EDF"], g_E)
  out_MD = jax.lax.ragged_dot(h_MF, w["wo_EFD"], g_E)
  return unpermute(out_MD, gates_NK, order_M, dest_NK)


def capacity_dispatch(w, x_ND, gates_NK, idx_NK, b: int, t: int, e: int, cf: float, act: str, impl: str,
                      expert_axis: str | None = None):
  """GShard-style capacity buffer [E, B*C, D]; with `expert_axis` (inside shard_map) the buffer's
  expert blocks travel to the devices owning those experts and back (all_to_all)."""
  k = idx_NK.shape[1]
  c = max(1, math.ceil(k * t / e * cf))
  # Per sequence, assignments in priority order: all top-1 choices, then all top-2, ...
  idx_BJ = idx_NK.reshape(b, t, k).transpose(0, 2, 1).reshape(b, k * t)
  onehot_BJE = jax.nn.one_hot(idx_BJ, e, dtype=jnp.int32)
  pos_BJ = jnp.take_along_axis(jnp.cumsum(onehot_BJE, axis=1) - 1, idx_BJ[..., None], axis=2)[..., 0]
  keep_BJ = pos_BJ < c
  rows = e * b * c
  row_BJ = jnp.where(keep_BJ, idx_BJ * (b * c) + jnp.arange(b)[:, None] * c + pos_BJ, rows)
  tok_BJ = jnp.arange(b)[:, None] * t + jnp.tile(jnp.arange(t), k)[None, :]
  row_token = jnp.full((rows,), b * t, jnp.int32).at[row_BJ.reshape(-1)].set(tok_BJ.reshape(-1), mode="drop")
  x_EQD = _pad_row(x_ND)[row_token].reshape(e, b * c, -1)
  if expert_axis is not None:  # [E, Q, D] -> [E/ne, ne*Q, D]: my experts, everyone's tokens
    x_EQD = jax.lax.all_to_all(x_EQD, expert_axis, 0, 1, tiled=True)
  out_EQD = _expert_ffn(w, x_EQD, act, impl)
  if expert_axis is not None:
    out_EQD = jax.lax.all_to_all(out_EQD, expert_axis, 1, 0, tiled=True)
  rows_NK = row_BJ.reshape(b, k, t).transpose(0, 2, 1).reshape(b * t, k)
  dropped = 1.0 - jnp.mean(keep_BJ.astype(jnp.float32))
  return _combine(out_EQD.reshape(rows, -1), rows_NK, gates_NK), dropped


def expert_choice(w, x_ND, logits_NE, b: int, t: int, k: int, cf: float, act: str, impl: str):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of a sequence."""
  e = logits_NE.shape[-1]
  c = max(1, min(t, math.ceil(k * t / e * cf)))
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  gates_BEC, tok_BEC = jax.lax.top_k(probs_NE.reshape(b, t, e).transpose(0, 2, 1), c)
  tok_BEC = tok_BEC + (jnp.arange(b) * t)[:, None, None]
  x_EQD = x_ND[tok_BEC.transpose(1, 0, 2).reshape(e, b * c)]
  out_BECD = _expert_ffn(w, x_EQD, act, impl).reshape(e, b, c, -1).transpose(1, 0, 2, 3)
  y_ND = jnp.zeros_like(x_ND, dtype=out_BECD.dtype).at[tok_BEC.reshape(-1)].add(
      (out_BECD * gates_BEC[..., None].astype(out_BECD.dtype)).reshape(-1, x_ND.shape[1]))
  served = jnp.zeros((b * t,), jnp.float32).at[tok_BEC.reshape(-1)].set(1.0)
  _, idx_NK = jax.lax.top_k(logits_NE, min(k, e))  # load/aux reported in the top-k token view
  return y_ND, probs_NE, 1.0 - jnp.mean(served), idx_NK


def routed(cfg: ModelConfig, e: int, w: dict, x_BTD, jitter_BTD=None, *, data_axes=(), expert_axis=None):
  """The routed (non-shared) part of an MoE layer on the tokens at hand: (y_BTD, metrics).
  `w` holds router_DE, router_bias_E, selection_bias_E (loss-free balancing; None without) and the
  (local) expert weights in the compute dtype;
  `jitter_BTD` (optional) multiplies the router input. Inside shard_map, `data_axes` are the mesh
  axes the tokens are split over."""
  b, t, d = x_BTD.shape
  k = cfg.top_k
  x_ND = x_BTD.reshape(b * t, d)
  xr_ND = x_ND.astype(jnp.float32)
  if jitter_BTD is not None:
    xr_ND = xr_ND * jitter_BTD.reshape(b * t, d)
  logits_NE = jnp.einsum("ND,DE->NE", xr_ND, w["router_DE"]) + w["router_bias_E"]
  mean = (lambda v: jax.lax.pmean(v, data_axes)) if data_axes else (lambda v: v)
  impl = default_impl() if cfg.moe_impl == "auto" else cfg.moe_impl
  if cfg.routing == "expert_choice":
    y_ND, probs_NE, dropped, idx_NK = expert_choice(w, x_ND, logits_NE, b, t, k, cfg.capacity_factor, cfg.mlp_act,
                                                    impl)
  else:
    probs_NE, gates_NK, idx_NK = top_k_gates(logits_NE, k, cfg.gating, w.get("selection_bias_E"))
    if cfg.dispatch == "capacity":
      y_ND, dropped = capacity_dispatch(w, x_ND, gates_NK, idx_NK, b, t, e, cfg.capacity_factor, cfg.mlp_act,
                                        impl, expert_axis)
    elif expert_axis is not None:  # expert-parallel dropless: this chip holds E / ne experts
      ep = {"gather": expert_parallel.gather_dispatch, "ragged": expert_parallel.ragged_dispatch}[exchange_of(cfg)]
      y_ND, dropped = ep(w, x_ND, gates_NK, idx_NK, activation(cfg.mlp_act), impl, expert_axis,
                         cfg.expert_buffer_factor)
    else:
      fn = dropless_ragged if impl == "ragged_dot" else dropless_blocks
      y_ND, dropped = fn(w, x_ND, gates_NK, idx_NK, cfg.mlp_act), jnp.zeros((), jnp.float32)
  aux, z, load_E, entropy, seq_aux = router_losses(logits_NE, probs_NE, idx_NK, mean, b)
  y_BTD = (y_ND * cfg.expert_output_scale).reshape(b, t, d).astype(x_BTD.dtype)  # routed scaling
  metrics = {"aux_loss": aux, "z_loss": z, "load": load_E, "dropped": mean(dropped), "router_entropy": entropy,
             "seq_aux_loss": seq_aux}
  return y_BTD, metrics


class MoeMlp(nnx.Module):
  """Token-choice top-k MoE MLP (expert choice as a flagged, non-causal ablation)."""

  def __init__(self, cfg: ModelConfig, num_experts: int, rngs: nnx.Rngs):
    d, f, e = cfg.d_model, cfg.expert_d_ff, num_experts
    self.router_DE = param(rngs, (d, e), ("embed", None), std=cfg.router_init_std)
    # Per-expert logit bias: zeros at init; growth uses it to add experts exactly.
    self.router_bias_E = param(None, (e,), (None,), init=lambda s: jnp.zeros(s, jnp.float32))
    if cfg.balance == "loss_free":  # selection-only bias: no gradient, moved by the train step
      self.selection_bias_E = param(None, (e,), (None,), init=lambda s: jnp.zeros(s, jnp.float32))
    self.wact_EDF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), fan_in_std(d))
    self.wlin_EDF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), fan_in_std(d)) if cfg.mlp_act == "swiglu" else None
    self.wo_EFD = param(rngs, (e, f, d), ("expert", "mlp", "embed"), fan_in_std(f))
    self.shared = (Mlp(d, cfg.num_shared_experts * cfg.shared_d_ff, cfg.mlp_act, jnp.dtype(cfg.dtype), rngs)
                   if cfg.num_shared_experts else None)
    if cfg.num_shared_experts and cfg.shared_gate:  # Qwen2-MoE: a learnt sigmoid gate per token
      self.shared_gate_D = param(rngs, (d,), ("embed",), fan_in_std(d))
    self.cfg, self.num_experts = cfg, e
    if cfg.routing == "expert_choice":
      logging.warning("moegrow: expert-choice routing picks tokens using the whole sequence; "
                      "it is NOT causal in a decoder (future tokens leak). Use only as an ablation.")

  def __call__(self, x_BTD, rng: jax.Array | None = None):
    cfg, e = self.cfg, self.num_experts
    dt = jnp.dtype(cfg.dtype)
    w = {"router_DE": self.router_DE[...], "router_bias_E": self.router_bias_E[...],
         "wact_EDF": self.wact_EDF[...].astype(dt), "wo_EFD": self.wo_EFD[...].astype(dt),
         "wlin_EDF": None if self.wlin_EDF is None else self.wlin_EDF[...].astype(dt),
         "selection_bias_E": self.selection_bias_E[...] if cfg.balance == "loss_free" else None}
    mesh = sharding.current_mesh()
    data_axes = sharding.batch_axes(mesh, x_BTD.shape[0]) if mesh is not None else ()
    jitter_BTD = None
    if cfg.router_jitter > 0 and rng is not None:
      # Multiplicative router jitter (Fedus et al. 2022), drawn for the whole batch so a given rng
      # gives the same noise on any mesh.
      jitter_BTD = constrain(jax.random.uniform(rng, x_BTD.shape, jnp.float32, 1 - cfg.router_jitter,
                                                1 + cfg.router_jitter), ("batch", "length", "act_embed"))
    if not data_axes or cfg.routing == "expert_choice":
      y_BTD, metrics = routed(cfg, e, w, x_BTD, jitter_BTD)
    else:
      y_BTD, metrics = self._sharded(mesh, data_axes, w, x_BTD, jitter_BTD)
    if self.shared is not None:
      s_BTD = self.shared(x_BTD)
      if cfg.shared_gate:
        g_BT1 = jax.nn.sigmoid(x_BTD.astype(jnp.float32) @ self.shared_gate_D[...][:, None])
        s_BTD = (s_BTD * g_BT1).astype(s_BTD.dtype)
      y_BTD = y_BTD + s_BTD
    return constrain(y_BTD, ("batch", "length", "act_embed")), metrics

  def _sharded(self, mesh, data_axes, w, x_BTD, jitter_BTD):
    """Routed part under shard_map: tokens stay on their devices (see the module docstring)."""
    cfg, e = self.cfg, self.num_experts
    ne = mesh.shape.get("expert", 1)
    # Experts split over the `expert` axis (each chip holds E / ne of them): capacity buffers by
    # all_to_all, dropless assignments by moegrow.model.expert_parallel. Otherwise (E not a multiple
    # of ne, or the batch not split over `expert`) every chip holds every expert.
    ep = "expert" if ne > 1 and e % ne == 0 and "expert" in data_axes else None
    P = jax.sharding.PartitionSpec
    x_spec = P(data_axes or None)
    w_specs = {k: (None if v is None else P("expert") if ep and k.startswith("w") else P()) for k, v in w.items()}
    w = {k: v for k, v in w.items() if v is not None}
    w_specs = {k: w_specs[k] for k in w}

    def local(w, x_BTD, jitter_BTD):
      return routed(cfg, e, w, x_BTD, jitter_BTD, data_axes=data_axes, expert_axis=ep)
    metric_specs = {"aux_loss": P(), "z_loss": P(), "load": P(), "dropped": P(), "router_entropy": P(),
                    "seq_aux_loss": P()}
    f = jax.shard_map(local, mesh=mesh, in_specs=(w_specs, x_spec, None if jitter_BTD is None else x_spec),
                      out_specs=(x_spec, metric_specs), check_vma=False)
    return f(w, x_BTD, jitter_BTD)
