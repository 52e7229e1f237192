"""Dropless grouped expert FFN for backends without a grouped matmul (XLA:CPU).

Shape letters (docs/letters.md): P rows (token-expert assignments sorted by expert, plus slack),
D model width, F expert hidden, E experts, R rows of one chunk.

Rows of expert e are the contiguous range [start_E[e], start_E[e] + size_E[e]) of x_PD. One
custom-VJP op runs the whole expert MLP, y = W_o (act(W_act x) * W_lin x), as two nested loops:
experts outside (each expert's weights are sliced once), chunks of that expert's rows inside,
with a dynamic trip count, so no padding rows are computed beyond the last chunk's tail. Chunks
are big first (512 rows), then the remainder is split in halves down to a tail size, so matmuls
stay large and the waste is under one small chunk per expert. The activation runs on one chunk
at a time (in cache), and the backward computes dx and dW of all three matrices in one pass.

A chunk may run past its expert's rows into the next expert's (or into the slack): experts are
visited in order, so those rows are overwritten by their owner later; in the backward the rows
past the group are masked before they reach dW. x_PD carries max(sizes) slack rows after the
last group, which keeps every chunk in bounds. Measured on a 2-core CPU: forward + backward
within 2-9% of a dense SwiGLU MLP with the same FLOPs (benchmarks/README.md); a per-block scan
that re-sliced expert weights for every block of rows was ~1.4x.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

BIG_CHUNK = 512


def chunk_sizes(m: int, e: int) -> tuple[int, ...]:
  """Chunk sizes, largest first: 512 and its halves down to a tail of <= 64 rows. Each level
  below the top runs at most once per expert (a binary split of the remainder). Every chunk
  pays fixed costs (a D x F accumulator add per weight in the backward, about a 128-row matmul),
  the tail wastes R/2 rows per expert on average: 64 balances the two (measured, E = 8 to 32)."""
  tail = 1 << max(0, int(math.log2(max(1, m // (2 * e)))))
  tail = int(min(64, max(16, tail)))
  out, r = [], BIG_CHUNK
  while r >= tail:
    out.append(r)
    r //= 2
  return tuple(out)


def sort_by_key(key_M, buckets: int):
  """Rows sorted by key (an expert, or a bucket past the experts), stable: (order_M, start, size,
  pos_M) where order_M lists the row indices in key order, start/size are each key's range of
  sorted rows and pos_M is each row's sorted position. The layout the grouped FFN reads."""
  m = key_M.shape[0]
  order_M = jnp.argsort(key_M, stable=True).astype(jnp.int32)
  size = jnp.zeros((buckets,), jnp.int32).at[key_M].add(1)
  pos_M = jnp.zeros((m,), jnp.int32).at[order_M].set(jnp.arange(m, dtype=jnp.int32))
  return order_M, jnp.cumsum(size) - size, size, pos_M


def _chunks(n, sizes, fn, carry):
  """carry = fn(offset, R, carry) over [0, n) in chunks: the big sizes while they fit, then the
  last size covers the tail (its last chunk may run past n)."""
  off = jnp.zeros((), jnp.int32)
  for i, r in enumerate(sizes):
    count = (n - off) // r if i < len(sizes) - 1 else (n - off + r - 1) // r
    carry = jax.lax.fori_loop(0, count, lambda j, c, off=off, r=r: fn(off + j * r, r, c), carry)
    off = off + count * r
  return carry


def _rows(a, start, r):
  return jax.lax.dynamic_slice_in_dim(a, start, r, 0)


def _put(a, u, start):
  return jax.lax.dynamic_update_slice_in_dim(a, u, start, 0)


def _f32_dot(a, b):
  return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _expert(w, e):
  return None if w is None else jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


def _forward(x_PD, wact_EDF, wlin_EDF, wo_EFD, start_E, size_E, act, sizes, save: bool):
  p, f = x_PD.shape[0], wact_EDF.shape[2]

  def expert(e, c):
    wact_DF, wlin_DF, wo_FD = _expert(wact_EDF, e), _expert(wlin_EDF, e), _expert(wo_EFD, e)
    s = start_E[e]

    def chunk(off, r, c):
      x_RD = _rows(x_PD, s + off, r)
      a_RF = x_RD @ wact_DF
      h_RF = act(a_RF)
      out = dict(c)
      if wlin_DF is not None:
        b_RF = x_RD @ wlin_DF
        h_RF = h_RF * b_RF
        if save:
          out["b"] = _put(c["b"], b_RF, s + off)
      if save:
        out["a"] = _put(c["a"], a_RF, s + off)
      out["y"] = _put(c["y"], h_RF @ wo_FD, s + off)
      return out
    return _chunks(size_E[e], sizes, chunk, c)

  c = {"y": jnp.zeros_like(x_PD)}
  if save:  # pre-activations: the backward's only residuals besides x and the weights
    c["a"] = jnp.zeros((p, f), x_PD.dtype)
    if wlin_EDF is not None:
      c["b"] = jnp.zeros((p, f), x_PD.dtype)
  return jax.lax.fori_loop(0, wact_EDF.shape[0], expert, c)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def expert_ffn(x_PD, wact_EDF, wlin_EDF, wo_EFD, start_E, size_E, act, sizes):
  """y_PD = W_o_e (act(x W_act_e) * x W_lin_e) for each row of expert e's range (wlin_EDF may be
  None: y = W_o_e act(x W_act_e)). Rows past sum(size_E) are unspecified; `sizes` come from
  `chunk_sizes` and x_PD needs max(sizes) rows of slack after the last group."""
  return _forward(x_PD, wact_EDF, wlin_EDF, wo_EFD, start_E, size_E, act, sizes, False)["y"]


def _ffn_fwd(x_PD, wact_EDF, wlin_EDF, wo_EFD, start_E, size_E, act, sizes):
  c = _forward(x_PD, wact_EDF, wlin_EDF, wo_EFD, start_E, size_E, act, sizes, True)
  return c["y"], (x_PD, wact_EDF, wlin_EDF, wo_EFD, start_E, size_E, c["a"], c.get("b"))


def _ffn_bwd(act, sizes, res, dy_PD):
  x_PD, wact_EDF, wlin_EDF, wo_EFD, start_E, size_E, a_PF, b_PF = res
  gated = wlin_EDF is not None

  def expert(e, c):
    wact_DF, wlin_DF, wo_FD = _expert(wact_EDF, e), _expert(wlin_EDF, e), _expert(wo_EFD, e)
    s, n = start_E[e], size_E[e]

    def chunk(off, r, cc):
      # Rows past this expert's group contribute nothing to its dW (and their dx is rewritten
      # by their owner later).
      valid_R1 = (off + jnp.arange(r) < n)[:, None]
      dy_RD = jnp.where(valid_R1, _rows(dy_PD, s + off, r), 0)
      x_RD, a_RF = _rows(x_PD, s + off, r), _rows(a_PF, s + off, r)
      g_RF, act_vjp = jax.vjp(act, a_RF)
      b_RF = _rows(b_PF, s + off, r) if gated else None
      h_RF = g_RF * b_RF if gated else g_RF
      dh_RF = dy_RD @ wo_FD.T
      acc = dict(cc["acc"])
      acc["wo"] = acc["wo"] + _f32_dot(h_RF.T, dy_RD)
      da_RF = act_vjp(dh_RF * b_RF if gated else dh_RF)[0]
      acc["wact"] = acc["wact"] + _f32_dot(x_RD.T, da_RF)
      dx_RD = da_RF @ wact_DF.T
      if gated:
        db_RF = dh_RF * g_RF
        acc["wlin"] = acc["wlin"] + _f32_dot(x_RD.T, db_RF)
        dx_RD = dx_RD + db_RF @ wlin_DF.T
      return {"acc": acc, "dx": _put(cc["dx"], dx_RD, s + off)}

    # dW sums over chunks in float32 (as one big matmul would), rounded once per expert.
    acc = {k: jnp.zeros(v.shape, jnp.float32) for k, v in (("wact", wact_DF), ("wlin", wlin_DF), ("wo", wo_FD))
           if v is not None}
    r = _chunks(n, sizes, chunk, {"acc": acc, "dx": c["dx"]})
    dw = {k: jax.lax.dynamic_update_index_in_dim(c["dw"][k], r["acc"][k].astype(c["dw"][k].dtype), e, 0)
          for k in acc}
    return {"dx": r["dx"], "dw": dw}

  dw = {k: jnp.zeros_like(v) for k, v in (("wact", wact_EDF), ("wlin", wlin_EDF), ("wo", wo_EFD)) if v is not None}
  c = jax.lax.fori_loop(0, wact_EDF.shape[0], expert, {"dx": jnp.zeros_like(x_PD), "dw": dw})
  return c["dx"], c["dw"]["wact"], c["dw"].get("wlin"), c["dw"]["wo"], None, None


expert_ffn.defvjp(_ffn_fwd, _ffn_bwd)
