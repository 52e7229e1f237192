"""Mixture-of-experts MLP: float32 router, top-k token choice, stacked experts.

Letter legend: B batch, T length, D model width, F expert hidden, E experts, K experts per
token, C capacity per expert per sequence, N = B*T tokens, M = N*K token-expert assignments,
Q blocks of R rows (dropless grouped matmul), P = Q*R padded rows.

Routing (Shazeer et al. 2017; Fedus et al. 2022; Zoph et al. 2022):
  softmax_topk:  g = top_k(softmax(z))            (weights not renormalised; Switch/GShard)
  topk_softmax:  g = softmax(top_k(z))            (renormalised over the chosen k; Mixtral)
Dispatch:
  capacity: each sequence gives expert e at most C = ceil(K*T/E * capacity_factor) slots,
            top-1 choices first (GShard priority); assignments beyond C are dropped.
  dropless: every assignment is computed. "blocks": sort by expert, pad each expert's group to
            a multiple of R rows, then a grouped matmul that scans the blocks (each with its
            expert's weights, unused padding blocks skipped; CPU: no E-fold masked product). "ragged_dot": jax.lax.ragged_dot grouped matmul
            (TPU/GPU; on XLA:CPU it lowers to a masked dense product, E times the FLOPs).
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moegrow.config import ModelConfig
from moegrow.layers import Mlp, activation, fan_in_std, param
from moegrow.sharding import constrain


def router_losses(logits_NE, probs_NE, idx_NK):
  """Switch load-balancing loss E * sum_e f_e P_e (Fedus et al. 2022, eq. 4), router z-loss
  mean(logsumexp(z)^2) (Zoph et al. 2022, eq. 5), load f_E and mean router entropy."""
  e = logits_NE.shape[-1]
  f_E = jnp.mean(jnp.sum(jax.nn.one_hot(idx_NK, e, dtype=jnp.float32), axis=1), axis=0) / idx_NK.shape[1]
  p_E = jnp.mean(probs_NE, axis=0)
  aux = e * jnp.sum(f_E * p_E)
  z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))
  entropy = -jnp.mean(jnp.sum(probs_NE * jnp.log(jnp.clip(probs_NE, 1e-9)), axis=-1))
  return aux, z, f_E, entropy


def top_k_gates(logits_NE, k: int, gating: str):
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  if gating == "softmax_topk":
    gates_NK, idx_NK = jax.lax.top_k(probs_NE, k)
  else:
    top_NK, idx_NK = jax.lax.top_k(logits_NE, k)
    gates_NK = jax.nn.softmax(top_NK, axis=-1)
  return probs_NE, gates_NK, idx_NK


def _gmm_scan(x_QRD, w_EDF, e_Q, used):
  def body(_, inp):
    x_RD, e, q = inp
    y_RF = jax.lax.cond(q < used, lambda: x_RD @ jax.lax.dynamic_index_in_dim(w_EDF, e, 0, keepdims=False),
                        lambda: jnp.zeros((x_RD.shape[0], w_EDF.shape[2]), x_RD.dtype))
    return None, y_RF
  return jax.lax.scan(body, None, (x_QRD, e_Q, jnp.arange(x_QRD.shape[0])))[1]


@jax.custom_vjp
def grouped_matmul(x_QRD, w_EDF, e_Q, used):
  """y[q] = x[q] @ w[e_Q[q]] for blocks q < used (zeros after): a dropless grouped matmul.

  A scan over blocks, so no [Q, D, F] copy of per-block weights is ever built; the backward
  accumulates dW in place per expert. Skipped blocks cost nothing (lax.cond)."""
  return _gmm_scan(x_QRD, w_EDF, e_Q, used)


def _gmm_fwd(x_QRD, w_EDF, e_Q, used):
  return _gmm_scan(x_QRD, w_EDF, e_Q, used), (x_QRD, w_EDF, e_Q, used)


def _gmm_bwd(res, dy_QRF):
  x_QRD, w_EDF, e_Q, used = res

  def body(dw_EDF, inp):
    x_RD, dy_RF, e, q = inp

    def work(dw_EDF):
      dx_RD = dy_RF @ jax.lax.dynamic_index_in_dim(w_EDF, e, 0, keepdims=False).T
      cur_1DF = jax.lax.dynamic_index_in_dim(dw_EDF, e, 0, keepdims=True)
      return jax.lax.dynamic_update_index_in_dim(dw_EDF, cur_1DF + (x_RD.T @ dy_RF)[None], e, 0), dx_RD
    return jax.lax.cond(q < used, work, lambda dw: (dw, jnp.zeros_like(x_RD)), dw_EDF)
  dw_EDF, dx_QRD = jax.lax.scan(body, jnp.zeros_like(w_EDF), (x_QRD, dy_QRF, e_Q, jnp.arange(x_QRD.shape[0])))
  return dx_QRD, dw_EDF, None, None


grouped_matmul.defvjp(_gmm_fwd, _gmm_bwd)


def default_impl() -> str:
  return "blocks" if jax.default_backend() == "cpu" else "ragged_dot"


def block_rows(m: int, e: int) -> int:
  """Rows per block for the dropless grouped matmul: padding costs < E*R rows of M."""
  r = 1 << max(0, int(math.log2(max(1, m // (8 * e)))))
  return int(min(256, max(16, r)))


class MoeMlp(nnx.Module):
  """Token-choice top-k MoE MLP (expert choice as a flagged, non-causal ablation)."""

  def __init__(self, cfg: ModelConfig, num_experts: int, rngs: nnx.Rngs):
    d, f, e = cfg.d_model, cfg.expert_d_ff, num_experts
    self.router_DE = param(rngs, (d, e), ("embed", None), std=cfg.router_init_std)
    # Per-expert logit bias: zeros at init; growth uses it to add experts exactly.
    self.router_bias_E = param(None, (e,), (None,), init=lambda s: jnp.zeros(s, jnp.float32))
    self.wi_EDF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), fan_in_std(d))
    self.wg_EDF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), fan_in_std(d)) if cfg.mlp_act == "swiglu" else None
    self.wo_EFD = param(rngs, (e, f, d), ("expert", "mlp", "embed"), fan_in_std(f))
    self.shared = (Mlp(d, cfg.num_shared_experts * cfg.shared_d_ff, cfg.mlp_act, jnp.dtype(cfg.dtype), rngs)
                   if cfg.num_shared_experts else None)
    self.cfg, self.num_experts = cfg, e
    if cfg.routing == "expert_choice":
      logging.warning("moegrow: expert-choice routing picks tokens using the whole sequence; "
                      "it is NOT causal in a decoder (future tokens leak). Use only as an ablation.")

  def _ffn(self, x_ERD):
    """Expert MLPs on a capacity buffer: row block e goes through expert e."""
    w = lambda p: p[...].astype(jnp.dtype(self.cfg.dtype))
    h_ERF = activation(self.cfg.mlp_act)(jnp.einsum("ERD,EDF->ERF", x_ERD, w(self.wi_EDF)))
    if self.wg_EDF is not None:
      h_ERF = h_ERF * jnp.einsum("ERD,EDF->ERF", x_ERD, w(self.wg_EDF))
    return jnp.einsum("ERF,EFD->ERD", h_ERF, w(self.wo_EFD))

  def __call__(self, x_BTD, rng: jax.Array | None = None):
    cfg, e, k = self.cfg, self.num_experts, self.cfg.top_k
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    xr_ND = x_ND.astype(jnp.float32)
    if cfg.router_jitter > 0 and rng is not None:  # multiplicative jitter (Fedus et al. 2022)
      xr_ND = xr_ND * jax.random.uniform(rng, xr_ND.shape, jnp.float32, 1 - cfg.router_jitter, 1 + cfg.router_jitter)
    logits_NE = jnp.einsum("ND,DE->NE", xr_ND, self.router_DE[...]) + self.router_bias_E[...]
    if cfg.routing == "expert_choice":
      y_ND, probs_NE, dropped, idx_NK = self._expert_choice(x_ND, logits_NE, b, t)
    else:
      probs_NE, gates_NK, idx_NK = top_k_gates(logits_NE, k, cfg.gating)
      if cfg.dispatch == "capacity":
        y_ND, dropped = self._capacity(x_ND, gates_NK, idx_NK, b, t)
      else:
        impl = default_impl() if cfg.moe_impl == "auto" else cfg.moe_impl
        y_ND = (self._ragged(x_ND, gates_NK, idx_NK) if impl == "ragged_dot"
                else self._blocks(x_ND, gates_NK, idx_NK))
        dropped = jnp.zeros((), jnp.float32)
    aux, z, load_E, entropy = router_losses(logits_NE, probs_NE, idx_NK)
    y_BTD = (y_ND * cfg.expert_output_scale).reshape(b, t, d).astype(x_BTD.dtype)
    if self.shared is not None:
      y_BTD = y_BTD + self.shared(x_BTD)
    metrics = {"aux_loss": aux, "z_loss": z, "load": load_E, "dropped": dropped, "router_entropy": entropy}
    return constrain(y_BTD, ("batch", "length", "act_embed")), metrics

  def _combine(self, out_PD, rows_NK, gates_NK):
    """y_n = sum_k g_nk * out[rows_nk]; a row index P (one past the end) means dropped."""
    out_PD = jnp.concatenate([out_PD, jnp.zeros((1, out_PD.shape[1]), out_PD.dtype)])
    return jnp.einsum("NKD,NK->ND", out_PD[rows_NK], gates_NK.astype(out_PD.dtype))

  def _blocks(self, x_ND, gates_NK, idx_NK):
    n, k = idx_NK.shape
    e, m = self.num_experts, n * k
    r = block_rows(m, e)
    q = (m + e * (r - 1)) // r  # sum_e ceil(g_e / R) <= (M + E) / R
    e_M = idx_NK.reshape(m)
    order_M = jnp.argsort(e_M, stable=True)
    g_E = jnp.zeros((e,), jnp.int32).at[e_M].add(1)
    padded_E = (g_E + r - 1) // r * r
    pend_E = jnp.cumsum(padded_E)
    e_sorted = e_M[order_M]
    # Row of the j-th sorted assignment: its group's padded start + its rank in the group.
    rank = jnp.arange(m) - (jnp.cumsum(g_E) - g_E)[e_sorted]
    dest_M = jnp.zeros((m,), jnp.int32).at[order_M].set((pend_E - padded_E)[e_sorted] + rank)
    row_token_P = jnp.full((q * r,), n, jnp.int32).at[dest_M].set(jnp.arange(m, dtype=jnp.int32) // k)
    x_QRD = jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])[row_token_P].reshape(q, r, -1)
    block_expert_Q = jnp.minimum(jnp.searchsorted(pend_E // r, jnp.arange(q), side="right"), e - 1)
    used = pend_E[-1] // r  # blocks past `used` are padding and skipped
    dt = jnp.dtype(self.cfg.dtype)
    gmm = lambda x, p: grouped_matmul(x, p[...].astype(dt), block_expert_Q, used)
    h_QRF = activation(self.cfg.mlp_act)(gmm(x_QRD.astype(dt), self.wi_EDF))
    if self.wg_EDF is not None:
      h_QRF = h_QRF * gmm(x_QRD.astype(dt), self.wg_EDF)
    out_PD = gmm(h_QRF, self.wo_EFD).reshape(q * r, -1)
    return self._combine(out_PD, dest_M.reshape(n, k), gates_NK)

  def _ragged(self, x_ND, gates_NK, idx_NK):
    n, k = idx_NK.shape
    e_M = idx_NK.reshape(n * k)
    order_M = jnp.argsort(e_M, stable=True)
    g_E = jnp.zeros((self.num_experts,), jnp.int32).at[e_M].add(1)
    xs_MD = x_ND[order_M // k]
    dt = jnp.dtype(self.cfg.dtype)
    w = lambda p: p[...].astype(dt)
    h_MF = activation(self.cfg.mlp_act)(jax.lax.ragged_dot(xs_MD, w(self.wi_EDF), g_E))
    if self.wg_EDF is not None:
      h_MF = h_MF * jax.lax.ragged_dot(xs_MD, w(self.wg_EDF), g_E)
    out_MD = jax.lax.ragged_dot(h_MF, w(self.wo_EFD), g_E)
    dest_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(n * k))
    return self._combine(out_MD, dest_M.reshape(n, k), gates_NK)

  def _capacity(self, x_ND, gates_NK, idx_NK, b, t):
    e, k = self.num_experts, self.cfg.top_k
    c = max(1, math.ceil(k * t / e * self.cfg.capacity_factor))
    # Per sequence, assignments in priority order: all top-1 choices, then all top-2, ...
    idx_BM = idx_NK.reshape(b, t, k).transpose(0, 2, 1).reshape(b, k * t)
    onehot_BME = jax.nn.one_hot(idx_BM, e, dtype=jnp.int32)
    pos_BM = jnp.take_along_axis(jnp.cumsum(onehot_BME, axis=1) - 1, idx_BM[..., None], axis=2)[..., 0]
    keep_BM = pos_BM < c
    rows = e * b * c
    row_BM = jnp.where(keep_BM, idx_BM * (b * c) + jnp.arange(b)[:, None] * c + pos_BM, rows)
    tok_BM = jnp.arange(b)[:, None] * t + jnp.tile(jnp.arange(t), k)[None, :]
    row_token = jnp.full((rows,), b * t, jnp.int32).at[row_BM.reshape(-1)].set(tok_BM.reshape(-1), mode="drop")
    x_ERD = jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)])[row_token].reshape(e, b * c, -1)
    x_ERD = constrain(x_ERD, ("act_expert", None, "act_embed"))
    out_PD = self._ffn(x_ERD).reshape(rows, -1)
    rows_NK = row_BM.reshape(b, k, t).transpose(0, 2, 1).reshape(b * t, k)
    dropped = 1.0 - jnp.mean(keep_BM.astype(jnp.float32))
    return self._combine(out_PD, rows_NK, gates_NK), dropped

  def _expert_choice(self, x_ND, logits_NE, b, t):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of a sequence."""
    e, k = self.num_experts, self.cfg.top_k
    c = max(1, min(t, math.ceil(k * t / e * self.cfg.capacity_factor)))
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    gates_BEC, tok_BEC = jax.lax.top_k(probs_NE.reshape(b, t, e).transpose(0, 2, 1), c)
    tok_BEC = tok_BEC + (jnp.arange(b) * t)[:, None, None]
    x_ERD = x_ND[tok_BEC.transpose(1, 0, 2).reshape(e, b * c)]
    out_BECD = self._ffn(x_ERD).reshape(e, b, c, -1).transpose(1, 0, 2, 3)
    y_ND = jnp.zeros_like(x_ND, dtype=out_BECD.dtype).at[tok_BEC.reshape(-1)].add(
        (out_BECD * gates_BEC[..., None].astype(out_BECD.dtype)).reshape(-1, x_ND.shape[1]))
    served = jnp.zeros((b * t,), jnp.float32).at[tok_BEC.reshape(-1)].set(1.0)
    # Load: fraction of slots per expert is uniform by construction; report the top-k token view.
    _, idx_NK = jax.lax.top_k(logits_NE, min(k, e))
    return y_ND, probs_NE, 1.0 - jnp.mean(served), idx_NK
