"""Attention variants: grouped-query / multi-query heads, q/k/v biases and qk-norm, against a naive
per-head numpy reference; growth ops stay exact with them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow import flops, trees
from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.model.layers import Attention
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
