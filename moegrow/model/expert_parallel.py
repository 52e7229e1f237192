"""Expert parallelism for dropless MoE dispatch: each chip holds E/ne experts, tokens travel.

Runs inside `shard_map` (moegrow.model.moe.MoeMlp) over the mesh axis `expert` of size ne. A chip
holds the experts [r * O, (r + 1) * O) of the layer (O = E / ne, r its index on the axis) and
routes its own N tokens; the K choices of every token go to the chips that own their experts and
the outputs come back. Two exchanges, one interface:

  gather  (runs everywhere, the CPU default): all-gather the group's tokens, choices and gates
          (W = ne * N tokens), compute the rows for the local experts, and reduce-scatter the
          gated outputs back to their tokens' chips. Traffic ~ ne * N * D per chip each way.
  ragged  (TPU/GPU default): sort my assignments by destination chip, `jax.lax.ragged_all_to_all`
          them (unpadded groups), run the local experts on what arrived, and send the outputs back
          the same way. Traffic ~ N * K * D per chip each way. XLA:CPU has no kernel for it, so on
          CPU it is compiled ahead of time only; `ragged_all_to_all_reference` (all-gather based,
          same arguments) checks the offsets and sizes bookkeeping on simulated CPU devices.

Buffers are static. A chip's expert buffer holds P rows: by default the worst case, every
assignment of the group to this chip (P = ne * N * K), so nothing is ever dropped. With
`ModelConfig.expert_buffer_factor` f > 0, P = min(ne * N * K, ceil(f * N * K)) (f times the
balanced share); assignments past P are dropped (they add nothing to their token's output, as in
capacity dispatch) and counted in the layer's `dropped` metric: never silently.

Shape letters (docs/letters.md): N local tokens, W = ne * N tokens of the expert group, K choices,
M assignments, P rows of a chip's expert buffer, E experts of the layer, O a chip's own experts
(E / ne), Z chips on the expert axis (senders or receivers), D model width, F expert hidden.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from moegrow.model.grouped_ffn import chunk_sizes, expert_ffn, sort_by_key


def buffer_rows(n_tokens: int, k: int, ne: int, factor: float) -> int:
  """P: rows of one chip's expert buffer for N local tokens (see the module docstring)."""
  worst = ne * n_tokens * k
  if factor <= 0:
    return worst
  return int(min(worst, max(8, 8 * math.ceil(factor * n_tokens * k / 8))))


def _take(a, i):
  return jnp.take(a, i, axis=0, mode="fill", fill_value=0)


def local_ffn(w, xs_PD, start_O, size_O, act_fn, impl: str):
  """The local experts on expert-sorted rows: rows [start_l, start_l + size_l) go through local
  expert l; rows past the groups are computed or not, but never read."""
  if impl == "ragged_dot":
    size_O = size_O.astype(jnp.int32)
    rows = xs_PD.shape[0]
    # ragged_dot takes groups from row 0 on: the rows past the last group form one more group of a
    # zero expert, so every row belongs to a group.
    pad = rows - jnp.sum(size_O)
    g = jnp.concatenate([size_O, pad[None]])
    zero = lambda a: jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)])
    h_PF = act_fn(jax.lax.ragged_dot(xs_PD, zero(w["wact_EDF"]), g))
    if w.get("wlin_EDF") is not None:
      h_PF = h_PF * jax.lax.ragged_dot(xs_PD, zero(w["wlin_EDF"]), g)
    return jax.lax.ragged_dot(h_PF, zero(w["wo_EFD"]), g)
  el = w["wact_EDF"].shape[0]
  sizes = chunk_sizes(xs_PD.shape[0], el)
  x_PD = jnp.concatenate([xs_PD, jnp.zeros((max(sizes), xs_PD.shape[1]), xs_PD.dtype)])
  y_PD = expert_ffn(x_PD, w["wact_EDF"], w.get("wlin_EDF"), w["wo_EFD"], start_O.astype(jnp.int32),
                    size_O.astype(jnp.int32), act_fn, sizes)
  return y_PD[:xs_PD.shape[0]]


def gather_dispatch(w, x_ND, gates_NK, idx_NK, act_fn, impl: str, axis: str, factor: float = 0.0):
  """Dropless expert-parallel MoE with the all-gather / reduce-scatter exchange: (y_ND, dropped),
  `dropped` the fraction of the group's assignments past the buffer (0 with the default buffer)."""
  n, k = idx_NK.shape
  ne = jax.lax.axis_size(axis)
  el = w["wact_EDF"].shape[0]
  first = jax.lax.axis_index(axis) * el
  x_WD = jax.lax.all_gather(x_ND, axis, tiled=True)
  idx_WK = jax.lax.all_gather(idx_NK, axis, tiled=True)
  gates_WK = jax.lax.all_gather(gates_NK, axis, tiled=True)
  g = x_WD.shape[0]
  local_WK = idx_WK - first
  mine_WK = (local_WK >= 0) & (local_WK < el)
  key_M = jnp.where(mine_WK, local_WK, el).reshape(g * k)  # not mine: one bucket past the local experts
  order_M, start_O, size_O, pos_M = sort_by_key(key_M, el + 1)
  r = buffer_rows(n, k, ne, factor)
  start_O, size_O = start_O[:el], size_O[:el]
  size_O = jnp.clip(jnp.minimum(size_O, r - start_O), 0)  # groups cut at the buffer's end
  kept_WK = mine_WK & (pos_M.reshape(g, k) < r)
  xs_PD = _take(x_WD, order_M[:r] // k)
  out_PD = local_ffn(w, xs_PD, start_O, size_O, act_fn, impl)
  dest_WK = jnp.where(kept_WK, pos_M.reshape(g, k), r)  # r: a zero row
  y_WD = jnp.einsum("WKD,WK->WD", _take(out_PD, dest_WK), gates_WK.astype(out_PD.dtype))
  y_ND = jax.lax.psum_scatter(y_WD, axis, scatter_dimension=0, tiled=True)
  lost = jax.lax.psum(jnp.sum(mine_WK & ~kept_WK), axis)
  return y_ND, lost.astype(jnp.float32) / (g * k)


def ragged_all_to_all_reference(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
  """`jax.lax.ragged_all_to_all`'s semantics from all-gathers and gathers (runs on XLA:CPU): sender
  s's rows operand[input_offsets[j] : + send_sizes[j]] land in receiver j's output at
  output_offsets[j] (as sent by s). `recv_sizes` is implied and unused."""
  del recv_sizes
  me = jax.lax.axis_index(axis_name)
  ops_ZPD = jax.lax.all_gather(operand, axis_name)
  io_ZZ = jax.lax.all_gather(input_offsets, axis_name)
  ss_ZZ = jax.lax.all_gather(send_sizes, axis_name)
  oo_ZZ = jax.lax.all_gather(output_offsets, axis_name)
  start_Z, size_Z, src0_Z = oo_ZZ[:, me], ss_ZZ[:, me], io_ZZ[:, me]
  row = jnp.arange(output.shape[0])
  inside_ZP = (row >= start_Z[:, None]) & (row < (start_Z + size_Z)[:, None])
  sender_P = jnp.argmax(inside_ZP, axis=0)
  src_P = src0_Z[sender_P] + row - start_Z[sender_P]
  vals = ops_ZPD[sender_P, jnp.clip(src_P, 0, operand.shape[0] - 1)]
  hit = jnp.any(inside_ZP, axis=0).reshape((-1,) + (1,) * (output.ndim - 1))
  return jnp.where(hit, vals, output)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _send(a2a, axis, rows, x, fwd, bwd):
  """Rows of x to their receivers by `a2a` with plan `fwd` = (input_offsets, send_sizes,
  output_offsets, recv_sizes) into a buffer of `rows` rows; the gradient travels back by `bwd`."""
  return a2a(x, jnp.zeros((rows,) + x.shape[1:], x.dtype), *fwd, axis_name=axis)


def _send_fwd(a2a, axis, rows, x, fwd, bwd):
  return _send(a2a, axis, rows, x, fwd, bwd), (x.shape[0], fwd, bwd)


def _send_bwd(a2a, axis, rows, res, dy):
  n, fwd, bwd = res
  zeros = lambda plan: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), plan)
  return a2a(dy, jnp.zeros((n,) + dy.shape[1:], dy.dtype), *bwd, axis_name=axis), zeros(fwd), zeros(bwd)


_send.defvjp(_send_fwd, _send_bwd)


def ragged_dispatch(w, x_ND, gates_NK, idx_NK, act_fn, impl: str, axis: str, factor: float = 0.0, a2a=None):
  """Dropless expert-parallel MoE with ragged all-to-all: (y_ND, dropped). `a2a` is the exchange
  (default `jax.lax.ragged_all_to_all`; `ragged_all_to_all_reference` on CPU)."""
  a2a = a2a or jax.lax.ragged_all_to_all
  n, k = idx_NK.shape
  ne = jax.lax.axis_size(axis)
  el = w["wact_EDF"].shape[0]
  e = ne * el
  me = jax.lax.axis_index(axis)
  r = buffer_rows(n, k, ne, factor)
  m = n * k
  # My assignments sorted by expert, so each receiver's are contiguous and in its expert order.
  order_M, start_E, size_E, pos_M = sort_by_key(idx_NK.reshape(m), e)
  xs_MD = _take(x_ND, order_M // k)
  count_ZE = jax.lax.all_gather(size_E, axis)  # every sender's count per expert
  c_ZZO = count_ZE.reshape(ne, ne, el)  # [sender, receiver, local expert of the receiver]
  c_ZZ = jnp.sum(c_ZZO, axis=-1)  # rows sender -> receiver
  land_ZZ = jnp.cumsum(c_ZZ, axis=0) - c_ZZ  # where sender s's rows start in receiver j's buffer
  fit_ZZ = jnp.clip(jnp.minimum(c_ZZ, r - land_ZZ), 0)  # rows that fit in the receiver's buffer
  src_ZZ = jnp.cumsum(c_ZZ, axis=1) - c_ZZ  # where they sit in the sender's sorted rows
  fwd = (src_ZZ[me], fit_ZZ[me], land_ZZ[me], fit_ZZ[:, me])
  bwd = (land_ZZ[:, me], fit_ZZ[:, me], src_ZZ[:, me], fit_ZZ[me])
  got_PD = _send(a2a, axis, r, xs_MD, fwd, bwd)
  # Received rows: sender-major; within a sender, by local expert. Their local expert ids:
  row_P = jnp.arange(r)
  start_Z, fit_Z = land_ZZ[:, me], fit_ZZ[:, me]
  inside_ZP = (row_P >= start_Z[:, None]) & (row_P < (start_Z + fit_Z)[:, None])
  sender_P = jnp.argmax(inside_ZP, axis=0)
  within_P = row_P - start_Z[sender_P]
  bounds_ZO = jnp.cumsum(c_ZZO[:, me, :], axis=-1)  # cumulative counts of each sender's chunk
  local_P = jnp.sum(within_P[:, None] >= bounds_ZO[sender_P], axis=-1)
  key_P = jnp.where(jnp.any(inside_ZP, axis=0), local_P, el)
  order_P, start_O, size_O, pos_P = sort_by_key(key_P, el + 1)
  out_PD = local_ffn(w, _take(got_PD, order_P), start_O[:el], size_O[:el], act_fn, impl)
  back_MD = _send(a2a, axis, m, _take(out_PD, pos_P), bwd, fwd)
  # A sorted row of mine came back iff it fit its receiver's buffer: position < src + fit there.
  chip_M = _take(idx_NK.reshape(m), order_M) // el  # receiver of each sorted row
  kept_sorted = jnp.arange(m) < (src_ZZ[me] + fit_ZZ[me])[chip_M]
  kept_NK = kept_sorted[pos_M].reshape(n, k)
  dest_NK = jnp.where(kept_NK, pos_M.reshape(n, k), m)
  y_ND = jnp.einsum("NKD,NK->ND", _take(back_MD, dest_NK), gates_NK.astype(back_MD.dtype))
  lost = jax.lax.psum(jnp.sum(~kept_NK), axis)
  return y_ND, lost.astype(jnp.float32) / (ne * m)
