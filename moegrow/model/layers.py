"""Transformer layers in Flax NNX: RMSNorm, causal rotary attention, dense MLP.

Shape letters: see docs/letters.md (B batch, T query length, S key length, D model width,
F MLP hidden, H heads, U key/value heads, A head dim, N = B*T tokens; in blockwise attention
I blocks, X query and Y key positions of one block). Parameters carry their shape in their name
(`wq_DHA`) and declare logical axes in the `logical_axes` metadata (see `moegrow.sharding`).

Attention kernels (`attend`, chosen by `ModelConfig.attention`; all causal, softmax in float32):
  "reference"  `causal_attention`: einsum with the whole [B, H, T, S] score matrix (CPU default).
  "blockwise"  `blockwise_attention`: online softmax over query and key blocks of
               `attention_block` positions in plain JAX; never holds more than one [B, H, X, Y]
               block of scores, forward or backward (blocks recomputed in the backward).
  "splash"     `splash_attention`: TPU Pallas splash attention (T a multiple of 128), per shard
               under `shard_map` on a mesh; `interpret=True` runs it on CPU (tests).
  "cudnn"      `cudnn_attention`: jax.nn.dot_product_attention's cuDNN kernel (GPU, bf16/fp16).
  "auto"       splash on TPU (blockwise if T % 128), cudnn on GPU for bf16/fp16, reference
               otherwise, by the platform of the active mesh (`moegrow.sharding.platform`), so a
               program compiled ahead of time for TPU on a CPU host gets the TPU kernel.
Grouped-query key/value heads are repeated to H before any kernel.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moegrow import sharding
from moegrow.config import ATTENTIONS, fan_in_std
from moegrow.sharding import constrain


def param(rngs: nnx.Rngs | None, shape, axes, std: float | None = None, init=None) -> nnx.Param:
  """Float32 parameter with logical axes; normal(std) (default 1/sqrt(fan_in)) or `init`."""
  if init is not None:
    value = init(shape)
  else:
    std = 1.0 / math.sqrt(shape[-2] if len(shape) >= 2 else shape[0]) if std is None else std
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
  def __init__(self, d: int, eps: float):
    self.scale_D = param(None, (d,), ("embed",), init=lambda s: jnp.ones(s, jnp.float32))
    self.eps = eps

  def __call__(self, x_BTD):
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale_D[...]).astype(x_BTD.dtype)


def rope(x_BTHA, positions_BT, theta: float):
  """Rotary position embedding (Su et al. 2021), rotate-half convention."""
  a = x_BTHA.shape[-1]
  freq_A2 = theta ** (-jnp.arange(0, a, 2, dtype=jnp.float32) / a)
  ang_BTA2 = positions_BT[..., None].astype(jnp.float32) * freq_A2
  sin, cos = jnp.sin(ang_BTA2)[:, :, None, :], jnp.cos(ang_BTA2)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHA.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHA.dtype)


def causal_attention(q_BTHA, k_BSHA, v_BSHA):
  """softmax(q k^T / sqrt(A) + causal mask) v, heads-major (measured ~20% faster than
  jax.nn.dot_product_attention's XLA path on CPU, forward + backward). Softmax in float32."""
  a = q_BTHA.shape[-1]
  s_BHTS = jnp.einsum("BTHA,BSHA->BHTS", q_BTHA, k_BSHA).astype(jnp.float32) / math.sqrt(a)
  t, s = s_BHTS.shape[-2:]
  s_BHTS = jnp.where(jnp.tril(jnp.ones((t, s), bool)), s_BHTS, -1e30)
  p_BHTS = jax.nn.softmax(s_BHTS, axis=-1).astype(v_BSHA.dtype)
  return jnp.einsum("BHTS,BSHA->BTHA", p_BHTS, v_BSHA)


_MASKED = -1e30  # score of a masked (future) key: finite, so exp() is exactly 0 without inf - inf


def blockwise_attention(q_BTHA, k_BSHA, v_BSHA, block: int = 512):
  """Causal attention as `causal_attention`, with an online softmax (Milakov & Gimelshein 2018;
  FlashAttention, Dao et al. 2022) over query blocks and key blocks of `block` positions
  (min(block, T); T is padded up to a multiple, the padding sliced off). Query block i reads key
  blocks 0..i (later ones are skipped by `lax.cond`), keeping a float32 running max, sum and
  output. Both loops' bodies are `jax.checkpoint`ed, so the backward recomputes each block's
  scores instead of saving them: it holds one [B, H, X, Y] block of scores, plus [I, B, H, X, A]
  running outputs of one query block, never [B, H, T, S]."""
  b, t, h, a = q_BTHA.shape
  if k_BSHA.shape[1] != t:
    raise ValueError(f"blockwise causal self-attention needs as many keys as queries: q {q_BTHA.shape}, "
                     f"k {k_BSHA.shape}")
  blk = min(int(block), t)
  nb = -(-t // blk)  # I

  def blocks(x_BTHA):  # [I, B, blk, H, A]
    x_BTHA = jnp.pad(x_BTHA, ((0, 0), (0, nb * blk - t), (0, 0), (0, 0)))
    return x_BTHA.reshape(b, nb, blk, h, a).swapaxes(0, 1)

  q_IBXHA, k_IBYHA, v_IBYHA = blocks(q_BTHA), blocks(k_BSHA), blocks(v_BSHA)
  scale = 1.0 / math.sqrt(a)
  offset_X = jnp.arange(blk)

  @jax.checkpoint
  def query_block(i, q_BXHA):
    qpos_X = i * blk + offset_X

    @jax.checkpoint
    def key_block(carry, xs):
      j, k_BYHA, v_BYHA = xs

      def update(carry):
        m_BHX, l_BHX, acc_BHXA = carry
        s_BHXY = jnp.einsum("BXHA,BYHA->BHXY", q_BXHA, k_BYHA, preferred_element_type=jnp.float32) * scale
        causal_XY = (j * blk + offset_X)[None, :] <= qpos_X[:, None]
        s_BHXY = jnp.where(causal_XY, s_BHXY, _MASKED)
        # The result does not depend on the running max (it cancels), so no gradient through it.
        m_new_BHX = jax.lax.stop_gradient(jnp.maximum(m_BHX, s_BHXY.max(axis=-1)))
        corr_BHX = jnp.exp(m_BHX - m_new_BHX)
        p_BHXY = jnp.exp(s_BHXY - m_new_BHX[..., None])
        pv_BHXA = jnp.einsum("BHXY,BYHA->BHXA", p_BHXY.astype(v_BYHA.dtype), v_BYHA,
                             preferred_element_type=jnp.float32)
        return m_new_BHX, l_BHX * corr_BHX + p_BHXY.sum(axis=-1), acc_BHXA * corr_BHX[..., None] + pv_BHXA

      return jax.lax.cond(j <= i, update, lambda carry: carry, carry), None

    init = (jnp.full((b, h, blk), _MASKED, jnp.float32), jnp.zeros((b, h, blk), jnp.float32),
            jnp.zeros((b, h, blk, a), jnp.float32))
    (_, l_BHX, acc_BHXA), _ = jax.lax.scan(key_block, init, (jnp.arange(nb), k_IBYHA, v_IBYHA))
    return (acc_BHXA / l_BHX[..., None]).astype(v_BSHA.dtype)

  out_IBHXA = jax.lax.map(lambda xs: query_block(*xs), (jnp.arange(nb), q_IBXHA))
  out_BTHA = out_IBHXA.transpose(1, 0, 3, 2, 4).reshape(b, nb * blk, h, a)
  return out_BTHA[:, :t]


def _splash_block(t: int) -> int:
  """The largest of 512, 256, 128 that divides T (T a multiple of 128)."""
  return next(blk for blk in (512, 256, 128) if t % blk == 0)


def _splash_kernel(h: int, t: int, interpret: bool):
  """Built per trace (it holds arrays, so it cannot be cached across traces; the mask
  processing inside is cached by the splash module)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  blk = _splash_block(t)
  sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                            block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(h)])
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTHA, k_BSHA, v_BSHA, interpret: bool = False):
  """Causal attention with the TPU Pallas splash kernel (`interpret=True`: the same kernel
  interpreted, on any backend). T must be a multiple of 128. The kernel works on one sequence's
  [H, T, A] (vmapped over B) and does not scale, so q is scaled by 1/sqrt(A) first. Inside an
  active mesh (`moegrow.sharding.use_mesh`) it runs per shard under `jax.shard_map`, batch over
  the batch axes and heads over the heads axis (where they divide)."""
  b, t, h, a = q_BTHA.shape
  if t % 128:
    raise ValueError(f"splash attention needs a seq length that is a multiple of 128, got seq length T={t} "
                     "(use attention='blockwise' or 'reference')")
  if k_BSHA.shape[1] != t:
    raise ValueError(f"splash causal self-attention needs as many keys as queries: q {q_BTHA.shape}, "
                     f"k {k_BSHA.shape}")
  q_BTHA = q_BTHA * jnp.asarray(1.0 / math.sqrt(a), q_BTHA.dtype)

  def local(q_BTHA, k_BSHA, v_BSHA):
    kernel = _splash_kernel(q_BTHA.shape[2], t, bool(interpret))
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # [B, H, T, A]
    out_BHTA = jax.vmap(kernel)(heads_major(q_BTHA), heads_major(k_BSHA), heads_major(v_BSHA))
    return heads_major(out_BHTA)

  mesh = sharding.current_mesh()
  if mesh is None or mesh.size == 1:
    return local(q_BTHA, k_BSHA, v_BSHA)
  batch = sharding.batch_axes(mesh, b)
  heads = sharding.logical_to_spec(("batch", "length", "heads", "kv"), mesh=mesh)[2]
  names = () if heads is None else (heads,) if isinstance(heads, str) else tuple(heads)
  if h % math.prod(mesh.shape[n] for n in names):
    heads = None
  spec = P(batch or None, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BTHA, k_BSHA, v_BSHA)


HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_attention(q_BTHA, k_BSHA, v_BSHA):
  """Causal attention with cuDNN's fused kernel (`jax.nn.dot_product_attention`, GPU only,
  bfloat16 / float16 only)."""
  if jnp.dtype(q_BTHA.dtype) not in HALF_DTYPES:
    raise ValueError(f"cudnn attention needs bfloat16 or float16 inputs, got dtype {jnp.dtype(q_BTHA.dtype).name} "
                     "(use dtype='bfloat16' or attention='reference'/'blockwise')")
  return jax.nn.dot_product_attention(q_BTHA, k_BSHA, v_BSHA, is_causal=True, implementation="cudnn")


def resolve_attention(impl: str, seq_len: int, dtype) -> str:
  """The kernel "auto" stands for on the active mesh's platform (other names unchanged)."""
  if impl != "auto":
    return impl
  platform = sharding.platform()
  if platform == "tpu":
    return "splash" if seq_len % 128 == 0 else "blockwise"
  if platform == "gpu" and jnp.dtype(dtype) in HALF_DTYPES:
    return "cudnn"
  return "reference"


def attend(q_BTHA, k_BSHA, v_BSHA, impl: str = "reference", block: int = 512, interpret: bool = False):
  """Causal attention by kernel `impl` (one of config.ATTENTIONS; see the module docstring);
  `block`: blockwise's block length; `interpret`: splash interpreted (runs on CPU)."""
  impl = resolve_attention(impl, q_BTHA.shape[1], q_BTHA.dtype)
  if impl == "reference":
    return causal_attention(q_BTHA, k_BSHA, v_BSHA)
  if impl == "blockwise":
    return blockwise_attention(q_BTHA, k_BSHA, v_BSHA, block)
  if impl == "splash":
    return splash_attention(q_BTHA, k_BSHA, v_BSHA, interpret=interpret)
  if impl == "cudnn":
    return cudnn_attention(q_BTHA, k_BSHA, v_BSHA)
  raise ValueError(f"attention={impl!r} not in {ATTENTIONS}")


class Attention(nnx.Module):
  """Causal self-attention with rotary embeddings: H query heads in U groups that share a key/value
  head (grouped-query attention; U = H multi-head, U = 1 multi-query). Query head h reads key/value
  head h // (H/U), the grouping of transformers' `repeat_kv`. Optional q/k/v biases and an RMSNorm
  on q and k before RoPE (`qk_norm`: "head" over A with weights shared by heads, "proj" over the
  whole projection H*A resp. U*A)."""

  def __init__(self, cfg, dtype, rngs: nnx.Rngs):
    d, h, u, a = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.wq_DHA = param(rngs, (d, h, a), ("embed", "heads", "kv"), fan_in_std(d))
    self.wk_DUA = param(rngs, (d, u, a), ("embed", "kv_heads", "kv"), fan_in_std(d))
    self.wv_DUA = param(rngs, (d, u, a), ("embed", "kv_heads", "kv"), fan_in_std(d))
    self.wo_HAD = param(rngs, (h, a, d), ("heads", "kv", "embed"), fan_in_std(h, a))
    zeros, ones = (lambda s: jnp.zeros(s, jnp.float32)), (lambda s: jnp.ones(s, jnp.float32))
    if cfg.qkv_bias:
      self.bq_HA = param(None, (h, a), ("heads", "kv"), init=zeros)
      self.bk_UA = param(None, (u, a), ("kv_heads", "kv"), init=zeros)
      self.bv_UA = param(None, (u, a), ("kv_heads", "kv"), init=zeros)
    if cfg.qk_norm == "head":
      self.qnorm_A = param(None, (a,), ("kv",), init=ones)
      self.knorm_A = param(None, (a,), ("kv",), init=ones)
    elif cfg.qk_norm == "proj":
      self.qnorm_HA = param(None, (h, a), ("heads", "kv"), init=ones)
      self.knorm_UA = param(None, (u, a), ("kv_heads", "kv"), init=ones)
    self.qkv_bias, self.qk_norm, self.eps = cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps
    self.rope_theta, self.dtype = cfg.rope_theta, dtype
    self.attention, self.attention_block = cfg.attention, cfg.attention_block
    self.interpret = False  # splash interpreted (tests on CPU)

  def _norm(self, x_BTXA, scale, axes):
    """RMSNorm of x over `axes` (float32), times `scale` (broadcast over B, T)."""
    x = x_BTXA.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=axes, keepdims=True) + self.eps)
    return (x * scale[...]).astype(x_BTXA.dtype)

  def __call__(self, x_BTD, positions_BT):
    # Projections as 2-D matmuls over N = B*T tokens: XLA:CPU runs the backward of
    # [B, T, D] x [D, ...] contractions ~2x slower than the same work on [N, D].
    b, t, d = x_BTD.shape
    _, h, a = self.wq_DHA.shape
    u = self.wk_DUA.shape[1]
    x_ND = x_BTD.reshape(b * t, d)
    proj = lambda p, n: (x_ND @ p[...].astype(self.dtype).reshape(d, n * a)).reshape(b, t, n, a)
    q_BTHA, k_BSUA, v_BSUA = proj(self.wq_DHA, h), proj(self.wk_DUA, u), proj(self.wv_DUA, u)
    if self.qkv_bias:
      q_BTHA = q_BTHA + self.bq_HA[...].astype(self.dtype)
      k_BSUA = k_BSUA + self.bk_UA[...].astype(self.dtype)
      v_BSUA = v_BSUA + self.bv_UA[...].astype(self.dtype)
    if self.qk_norm == "head":
      q_BTHA, k_BSUA = self._norm(q_BTHA, self.qnorm_A, -1), self._norm(k_BSUA, self.knorm_A, -1)
    elif self.qk_norm == "proj":
      q_BTHA = self._norm(q_BTHA, self.qnorm_HA, (-2, -1))
      k_BSUA = self._norm(k_BSUA, self.knorm_UA, (-2, -1))
    q_BTHA = rope(q_BTHA, positions_BT, self.rope_theta)
    k_BSUA = rope(k_BSUA, positions_BT, self.rope_theta)
    if u != h:  # each key/value head serves H/U consecutive query heads
      k_BSHA, v_BSHA = jnp.repeat(k_BSUA, h // u, axis=2), jnp.repeat(v_BSUA, h // u, axis=2)
    else:
      k_BSHA, v_BSHA = k_BSUA, v_BSUA
    q_BTHA = constrain(q_BTHA, ("batch", "length", "heads", "kv"))
    out_BTHA = attend(q_BTHA, k_BSHA, v_BSHA, self.attention, self.attention_block, self.interpret)
    out_ND = out_BTHA.reshape(b * t, h * a) @ self.wo_HAD[...].astype(self.dtype).reshape(h * a, d)
    return constrain(out_ND.reshape(b, t, d), ("batch", "length", "act_embed"))


def activation(name: str):
  return {"swiglu": jax.nn.silu, "gelu": jax.nn.gelu}[name]


class Mlp(nnx.Module):
  """Dense MLP: y = W_o (act(W_act x) * W_lin x) for SwiGLU, W_o act(W_act x) for GELU."""

  def __init__(self, d: int, f: int, act: str, dtype, rngs: nnx.Rngs):
    self.wact_DF = param(rngs, (d, f), ("embed", "mlp"), fan_in_std(d))
    self.wlin_DF = param(rngs, (d, f), ("embed", "mlp"), fan_in_std(d)) if act == "swiglu" else None
    self.wo_FD = param(rngs, (f, d), ("mlp", "embed"), fan_in_std(f))
    self.act, self.dtype = act, dtype

  def __call__(self, x_BTD):
    w = lambda p: p[...].astype(self.dtype)
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])  # 2-D matmuls (see Attention)
    h_NF = activation(self.act)(x_ND @ w(self.wact_DF))
    if self.wlin_DF is not None:
      h_NF = h_NF * (x_ND @ w(self.wlin_DF))
    h_NF = constrain(h_NF, ("batch", "mlp"))
    return (h_NF @ w(self.wo_FD)).reshape(x_BTD.shape)
