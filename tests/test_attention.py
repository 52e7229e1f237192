"""Attention variants: grouped-query / multi-query heads, q/k/v biases and qk-norm, against a naive
per-head numpy reference; growth ops stay exact with them. Attention kernels (blockwise, splash
interpreted on CPU, cudnn's refusals, "auto") against the reference `causal_attention`."""
import contextlib
import io
import re

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from moegrow import flops, sharding
from moegrow.config import ModelConfig
from moegrow.model import layers
from moegrow.model import transformer as tf
from moegrow.model.layers import Attention, attend, causal_attention
from moegrow.params import trees
from moegrow.surgery import apply as surgery

KEY = jax.random.PRNGKey(3)


def naive_attention(x_TD, p, cfg):
  """One sequence, loops over heads and positions; numpy float64."""
  t, _ = x_TD.shape
  h, u, a = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x = x_TD.astype(np.float64)
  rms = lambda v, w: v / np.sqrt(np.mean(v * v) + cfg.norm_eps) * w

  def rope(v, pos):  # rotate-half: pairs (i, i + a/2)
    half = a // 2
    out = np.empty_like(v)
    for i in range(half):
      ang = pos * cfg.rope_theta ** (-2 * i / a)
      out[i] = v[i] * np.cos(ang) - v[i + half] * np.sin(ang)
      out[i + half] = v[i + half] * np.cos(ang) + v[i] * np.sin(ang)
    return out

  q = np.stack([x @ p["wq_DHA"][:, j] for j in range(h)], 1)  # [T, H, A]
  k = np.stack([x @ p["wk_DUA"][:, j] for j in range(u)], 1)  # [T, U, A]
  v = np.stack([x @ p["wv_DUA"][:, j] for j in range(u)], 1)
  if cfg.qkv_bias:
    q, k, v = q + p["bq_HA"], k + p["bk_UA"], v + p["bv_UA"]
  for s in range(t):
    if cfg.qk_norm == "head":
      q[s] = [rms(q[s, j], p["qnorm_A"]) for j in range(h)]
      k[s] = [rms(k[s, j], p["knorm_A"]) for j in range(u)]
    elif cfg.qk_norm == "proj":
      q[s] = rms(q[s], p["qnorm_HA"])
      k[s] = rms(k[s], p["knorm_UA"])
    q[s] = [rope(q[s, j], s) for j in range(h)]
    k[s] = [rope(k[s, j], s) for j in range(u)]
  out = np.zeros_like(x)
  for j in range(h):
    g = j // (h // u)  # the key/value head query head j reads
    for s in range(t):
      scores = np.array([q[s, j] @ k[r, g] for r in range(s + 1)]) / np.sqrt(a)
      w = np.exp(scores - scores.max())
      o = (w / w.sum()) @ v[: s + 1, g]
      out[s] += o @ p["wo_HAD"][j]
  return out


def randomised(params, seed=1):
  """Every leaf plus noise, so zero biases and unit norm weights cannot hide a mistake."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


VARIANTS = [dict(num_heads=4, num_kv_heads=4), dict(num_heads=4, num_kv_heads=2, qkv_bias=True),
            dict(num_heads=4, num_kv_heads=1, qk_norm="head"), dict(num_heads=6, num_kv_heads=2, qk_norm="proj"),
            dict(num_heads=4, num_kv_heads=2, qkv_bias=True, qk_norm="head")]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_attention_matches_naive_per_head_reference(kw):
  cfg = ModelConfig(d_model=24, head_dim=8, num_layers=1, d_ff=16, **kw)
  params = randomised(tf.init_params(cfg, 0))
  p = {k: np.asarray(v) for k, v in params["blocks"]["0"]["attn"].items()}
  attn = Attention(cfg, jnp.float32, __import__("flax").nnx.Rngs(0))
  for name, value in p.items():
    getattr(attn, name)[...] = jnp.asarray(value)
  x_BTD = jax.random.normal(jax.random.PRNGKey(5), (2, 7, 24))
  got = np.asarray(attn(x_BTD, jnp.broadcast_to(jnp.arange(7), (2, 7))))
  for b in range(2):
    np.testing.assert_allclose(got[b], naive_attention(np.asarray(x_BTD[b]), p, cfg), atol=2e-5, rtol=1e-5)
  shapes = {k: v.shape for k, v in p.items()}
  assert shapes["wk_DUA"] == (24, cfg.num_kv_heads, 8) and shapes["wq_DHA"] == (24, cfg.num_heads, 8)


def test_param_count_matches_the_leaves():
  cfg = ModelConfig(d_model=24, head_dim=8, num_heads=4, num_kv_heads=2, qkv_bias=True, qk_norm="proj",
                    num_layers=2, d_ff=16, moe_layers="every_other", num_experts=3, top_k=2)
  leaves = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tf.abstract_params(cfg)))
  assert flops.count_params(cfg)["total"] == leaves


def test_num_kv_heads_must_divide_num_heads():
  with pytest.raises(ValueError, match=r"num_heads=6 must be a multiple of num_kv_heads=4"):
    ModelConfig(d_model=24, num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match=r"qk_norm='rms' not in"):
    ModelConfig(qk_norm="rms")
  assert ModelConfig(num_heads=4).num_kv_heads == 4  # 0: multi-head


def gqa(**kw):
  base = dict(d_model=16, head_dim=4, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=32, qkv_bias=True,
              qk_norm="head", moe_layers="every_other", num_experts=4, top_k=2, router_init_std=0.5)
  return ModelConfig(**{**base, **kw})


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 24)), jnp.int32)
_apply = jax.jit(tf.apply, static_argnums=0)


@pytest.mark.parametrize("make,ops", [
    (gqa, [dict(op="add_heads", num_heads=8)]),  # 2 -> 4 key/value groups of 2
    (lambda: gqa(num_kv_heads=1), [dict(op="add_heads", num_heads=8)]),  # multi-query: 1 -> 2 groups
    (lambda: gqa(qk_norm="proj"), [dict(op="insert_blocks", positions=[1])]),
    (gqa, [dict(op="widen_model", d_model=24)]),
    (lambda: gqa(qk_norm="proj"), [dict(op="widen_model", d_model=24)]),
    (gqa, [dict(op="add_heads", num_heads=6, ramp_steps=3)]),
    (lambda: gqa(tie_embeddings=True, tied_logit_scale=False, num_shared_experts=1, shared_d_ff=8, shared_gate=True),
     [dict(op="widen_model", d_model=24), dict(op="insert_blocks", positions=[0], num_experts=2)]),
], ids=["add_heads", "add_heads_mqa", "insert_blocks_projnorm", "widen_model", "widen_model_projnorm", "add_heads_ramped",
        "hf_style_tied_head_and_gated_shared_expert"])
def test_growth_is_exact_with_grouped_query_attention(make, ops):
  cfg = make()
  params = randomised(tf.init_params(cfg, 0))
  before = np.asarray(_apply(cfg, params, TOKENS)[0])
  new, cfg2, reports = surgery.apply_ops({"params": params}, cfg, ops, KEY, shapes=tf.abstract_params)
  after = np.asarray(_apply(cfg2, new["params"], TOKENS)[0])
  # round-off relative to the logits' scale (untied-style HF heads give logits up to ~20 here)
  np.testing.assert_allclose(after, before, atol=1e-5 * max(1.0, np.abs(before).max()), rtol=0)
  assert all(r["exact"] for r in reports)
  if ops[0]["op"] == "add_heads":
    group = cfg.num_heads // cfg.num_kv_heads
    assert (cfg2.num_heads, cfg2.num_kv_heads) == (ops[0]["num_heads"], ops[0]["num_heads"] // group)
    flat, old = trees.flatten(new["params"]), trees.flatten(params)
    # old key/value heads kept in place, new ones random (so the exactness above can fail)
    np.testing.assert_array_equal(flat["blocks/0/attn/wk_DUA"][:, : cfg.num_kv_heads], old["blocks/0/attn/wk_DUA"])
    assert np.abs(np.asarray(flat["blocks/0/attn/wk_DUA"][:, cfg.num_kv_heads:])).min() > 0


@pytest.mark.parametrize("make,heads,match", [
    (gqa, 7, r"num_heads=7 must be a multiple of the 2 query heads per key/value group"),
    (lambda: gqa(qk_norm="proj"), 8, r"qk_norm='proj' normalises q over all heads"),
])
def test_add_heads_refuses_what_it_cannot_do_exactly(make, heads, match):
  cfg = make()
  with pytest.raises(ValueError, match=match):
    surgery.apply_ops({"params": tf.init_params(cfg)}, cfg, [dict(op="add_heads", num_heads=heads)], KEY,
                      shapes=tf.abstract_params)


# ---------------------------------------------------------------- attention kernels

def qkv(b, t, h, a, seed=0, dtype=jnp.float32):
  k_q, k_k, k_v, k_r = jax.random.split(jax.random.PRNGKey(seed), 4)
  q_BTHA, k_BSHA, v_BSHA = (jax.random.normal(k, (b, t, h, a), dtype) for k in (k_q, k_k, k_v))
  return q_BTHA, k_BSHA, v_BSHA, jax.random.normal(k_r, (b, t, h, a), jnp.float32)


def value_and_grads(fn, q_BTHA, k_BSHA, v_BSHA, r_BTHA):
  """fn's output and the gradients w.r.t. q, k, v of sum(out * r) (a random cotangent)."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * r_BTHA)
  out = jax.jit(fn)(q_BTHA, k_BSHA, v_BSHA)
  return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q_BTHA, k_BSHA, v_BSHA)


def assert_matches_reference(fn, q_BTHA, k_BSHA, v_BSHA, r_BTHA, tol=1e-5):
  want, want_grads = value_and_grads(causal_attention, q_BTHA, k_BSHA, v_BSHA, r_BTHA)
  got, got_grads = value_and_grads(fn, q_BTHA, k_BSHA, v_BSHA, r_BTHA)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=0)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("t,block,h", [(64, 16, 2), (40, 16, 4), (7, 16, 2), (33, 1, 2)],
                         ids=["T=4_blocks", "T=40_padded", "block>T", "block=1"])
def test_blockwise_matches_reference_forward_and_gradients(t, block, h):
  q_BTHA, k_BSHA, v_BSHA, r_BTHA = qkv(2, t, h, 8, seed=t)
  assert_matches_reference(lambda q, k, v: attend(q, k, v, "blockwise", block), q_BTHA, k_BSHA, v_BSHA, r_BTHA)


def largest_intermediate(fn, *args) -> int:
  """Elements of the largest value anywhere in fn's jaxpr, sub-jaxprs (scan, cond, remat) included."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield from (v.aval.size for v in eqn.outvars if hasattr(v.aval, "size"))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (tuple, list)) else (p,):
          if isinstance(sub, jex.ClosedJaxpr):
            yield from walk(sub.jaxpr)
          elif isinstance(sub, jex.Jaxpr):
            yield from walk(sub)
  return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_blockwise_never_builds_the_score_matrix_forward_or_backward():
  b, t, h, a = 2, 64, 2, 8
  q_BTHA, k_BSHA, v_BSHA, _ = qkv(b, t, h, a)
  grad = lambda impl: jax.grad(lambda q, k, v: attend(q, k, v, impl, 16).sum(), argnums=(0, 1, 2))
  scores = b * h * t * t
  assert largest_intermediate(grad("reference"), q_BTHA, k_BSHA, v_BSHA) >= scores  # the check sees them
  # blockwise: at most the stacked blocks [I, B, X, H, A] = B*T*H*A (4x smaller than the scores here)
  assert largest_intermediate(grad("blockwise"), q_BTHA, k_BSHA, v_BSHA) <= b * t * h * a < scores
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):  # what the forward saves for the backward
    print_saved_residuals(lambda q, k, v: attend(q, k, v, "blockwise", 16).sum(), q_BTHA, k_BSHA, v_BSHA)
  sizes = [int(np.prod([int(n) for n in m.split(",") if n])) for m in re.findall(r"\w+\[([\d,]*)\]", buf.getvalue())]
  assert sizes and max(sizes) <= b * t * h * a


@pytest.mark.parametrize("t", [128, 256])
def test_splash_interpreted_matches_reference_forward_and_gradients(t):
  q_BTHA, k_BSHA, v_BSHA, r_BTHA = qkv(2, t, 2, 16, seed=t)
  assert_matches_reference(lambda q, k, v: attend(q, k, v, "splash", interpret=True), q_BTHA, k_BSHA, v_BSHA,
                           r_BTHA)


def test_splash_runs_per_shard_on_a_mesh():
  """On a data=2, tensor=2 mesh the kernel runs under shard_map, on 2 sequences and 2 heads per
  shard, and still equals the reference."""
  q_BTHA, k_BSHA, v_BSHA, r_BTHA = qkv(4, 128, 4, 16, seed=1)
  mesh = sharding.make_mesh({"data": 2, "tensor": 2})
  fn = lambda q, k, v: attend(q, k, v, "splash", interpret=True)
  with sharding.use_mesh(mesh):
    text = jax.jit(fn).lower(q_BTHA, k_BSHA, v_BSHA).as_text()
    assert "manual_computation" in text and "tensor<2x128x2x16xf32>" in text
    assert_matches_reference(fn, q_BTHA, k_BSHA, v_BSHA, r_BTHA)


def test_splash_and_cudnn_refuse_what_they_cannot_run():
  q_BTHA, k_BSHA, v_BSHA, _ = qkv(1, 96, 2, 16)
  with pytest.raises(ValueError, match=r"seq length.*T=96"):
    attend(q_BTHA, k_BSHA, v_BSHA, "splash", interpret=True)
  with pytest.raises(ValueError, match=r"cudnn attention needs bfloat16 or float16.*float32"):
    attend(q_BTHA, k_BSHA, v_BSHA, "cudnn")
  with pytest.raises(ValueError, match=r"attention='flash' not in"):
    attend(q_BTHA, k_BSHA, v_BSHA, "flash")


@pytest.mark.parametrize("platform,t,dtype,want", [
    ("tpu", 256, jnp.float32, "splash"), ("tpu", 200, jnp.bfloat16, "blockwise"),
    ("gpu", 200, jnp.bfloat16, "cudnn"), ("gpu", 256, jnp.float16, "cudnn"), ("gpu", 256, jnp.float32, "reference"),
    ("cpu", 256, jnp.bfloat16, "reference")])
def test_auto_picks_the_kernel_by_the_mesh_platform(monkeypatch, platform, t, dtype, want):
  monkeypatch.setattr(sharding, "platform", lambda mesh=None: platform)
  assert layers.resolve_attention("auto", t, dtype) == want
  assert layers.resolve_attention("blockwise", t, dtype) == "blockwise"  # explicit choices stay


def test_auto_is_the_reference_on_this_cpu():
  q_BTHA, k_BSHA, v_BSHA, _ = qkv(1, 16, 2, 8)
  assert layers.resolve_attention("auto", 16, jnp.float32) == "reference"
  np.testing.assert_array_equal(np.asarray(attend(q_BTHA, k_BSHA, v_BSHA, "auto")),
                                np.asarray(causal_attention(q_BTHA, k_BSHA, v_BSHA)))


def test_model_with_blockwise_attention_matches_reference_logits_and_gradients():
  """A whole model (grouped-query heads, T=128 in 4 blocks of 32): logits and the loss gradient of
  every parameter agree between attention="blockwise" and "reference"."""
  base = dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, attention_block=32)
  tokens_BT = jnp.asarray(np.random.default_rng(1).integers(0, 259, (2, 129)), jnp.int32)
  inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
  params = None
  out = {}
  for impl in ("reference", "blockwise"):
    cfg = ModelConfig(**base, attention=impl)
    params = params if params is not None else randomised(tf.init_params(cfg, 0), seed=2)

    def loss(p, cfg=cfg):
      logits_BTV = tf.apply(cfg, p, inputs_BT)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean(), logits_BTV

    out[impl] = jax.jit(jax.grad(loss, has_aux=True))(params)
  (g_ref, logits_ref), (g_blk, logits_blk) = out["reference"], out["blockwise"]
  np.testing.assert_allclose(np.asarray(logits_blk), np.asarray(logits_ref), atol=1e-4 * np.abs(logits_ref).max())
  for (path, g), w in zip(trees.flatten(g_blk).items(), trees.flatten(g_ref).values()):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * max(1.0, np.abs(w).max()), rtol=0,
                               err_msg=path)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_attention_module_dispatches_to_the_configured_kernel(impl):
  """The Attention layer (grouped-query heads, qk-norm, biases) with attention=impl equals the same
  layer with the reference kernel; splash interpreted (the layer's `interpret` switch)."""
  base = dict(d_model=32, head_dim=16, num_layers=1, d_ff=16, num_heads=4, num_kv_heads=2, qkv_bias=True,
              qk_norm="head", attention_block=48)
  x_BTD = jax.random.normal(jax.random.PRNGKey(5), (2, 128, 32))
  positions_BT = jnp.broadcast_to(jnp.arange(128), (2, 128))
  params = randomised(tf.init_params(ModelConfig(**base), 0))["blocks"]["0"]["attn"]
  out = {}
  for kernel in ("reference", impl):
    attn = Attention(ModelConfig(**base, attention=kernel), jnp.float32, __import__("flax").nnx.Rngs(0))
    attn.interpret = True
    for name, value in params.items():
      getattr(attn, name)[...] = value
    out[kernel] = np.asarray(attn(x_BTD, positions_BT))
    program = str(jax.make_jaxpr(lambda x: attn(x, positions_BT))(x_BTD))
    marker = {"blockwise": "cond[", "splash": "pallas_call"}[impl]  # the kernel that really ran
    assert (marker in program) == (kernel == impl)
  np.testing.assert_allclose(out[impl], out["reference"], atol=1e-5 * np.abs(out["reference"]).max(), rtol=0)
