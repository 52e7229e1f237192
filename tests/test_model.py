"""Model correctness against independent references (issue: the model)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.model.grouped_ffn import expert_ffn
from moegrow.model.layers import Mlp, activation
from moegrow.model.moe import MoeMlp, router_losses
from moegrow.params.trees import to_plain

D, F, E, K = 16, 24, 4, 2


def moe_cfg(**kw):
  base = dict(d_model=D, d_ff=F, num_layers=1, num_heads=2, moe_layers="all", num_experts=E, top_k=K)
  base.update(kw)
  return ModelConfig(**base)


def params_np(layer):
  return {k: np.asarray(v, np.float64) for k, v in to_plain(nnx.to_pure_dict(nnx.state(layer))).items()
          if not isinstance(v, dict)}


def silu(x):
  return x / (1 + np.exp(-x))


def naive_moe(layer, cfg, x_BTD, capacity=None):
  """Loop over tokens: softmax router, top-k, weighted sum of that token's expert MLPs."""
  p = params_np(layer)
  b, t, d = x_BTD.shape
  x = np.asarray(x_BTD, np.float64)
  y = np.zeros_like(x)
  # Which (token, choice) pairs fit in capacity: per sequence, top-1 choices first, in token order.
  choices = {}
  for bi in range(b):
    for ti in range(t):
      z = x[bi, ti] @ p["router_DE"] + p["router_bias_E"]
      probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      top = np.argsort(-probs, kind="stable")[:cfg.top_k]
      if cfg.gating == "softmax_topk":
        gates = probs[top]
      else:
        gates = np.exp(z[top] - z[top].max()) / np.exp(z[top] - z[top].max()).sum()
      choices[bi, ti] = list(zip(top, gates))
  kept, dropped = set(), 0
  for bi in range(b):
    count = np.zeros(layer.num_experts, int)
    for j in range(cfg.top_k):
      for ti in range(t):
        e = choices[bi, ti][j][0]
        if capacity is None or count[e] < capacity:
          kept.add((bi, ti, j))
        else:
          dropped += 1
        count[e] += 1
  for (bi, ti), ch in choices.items():
    for j, (e, g) in enumerate(ch):
      if (bi, ti, j) not in kept:
        continue
      h = silu(x[bi, ti] @ p["wact_EDF"][e]) * (x[bi, ti] @ p["wlin_EDF"][e])
      y[bi, ti] += g * (h @ p["wo_EFD"][e])
  y *= cfg.expert_output_scale
  if layer.shared is not None:
    s = {k: np.asarray(v[...], np.float64) for k, v in vars(layer.shared).items() if isinstance(v, nnx.Param)}
    y += (silu(x @ s["wact_DF"]) * (x @ s["wlin_DF"])) @ s["wo_FD"]
  return y, dropped / (b * t * cfg.top_k), kept


def random_x(b=2, t=12, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)


def make_layer(cfg, seed=0, router_std=1.0):
  layer = MoeMlp(cfg, E, nnx.Rngs(seed))
  # A spread-out router so top-k choices are well separated (no near-ties).
  layer.router_DE[...] = router_std * jax.random.normal(jax.random.key(seed + 7), (D, E))
  layer.router_bias_E[...] = 0.3 * jax.random.normal(jax.random.key(seed + 8), (E,))
  return layer


def mode_kw(mode):
  """dropless "blocks"/"ragged_dot"; capacity with room for all through the fused FFN ("capacity")
  or batched einsums ("capacity_einsum")."""
  if mode.startswith("capacity"):
    return dict(dispatch="capacity", capacity_factor=float(E), moe_impl="ragged_dot" if "einsum" in mode else "blocks")
  return dict(moe_impl=mode)


@pytest.mark.parametrize("gating", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("mode", ["blocks", "ragged_dot", "capacity", "capacity_einsum"])
def test_moe_matches_naive_reference(gating, shared, mode):
  kw = mode_kw(mode)
  cfg = moe_cfg(gating=gating, num_shared_experts=shared, expert_output_scale=1.5, **kw)
  layer = make_layer(cfg)
  x = random_x()
  y, metrics = layer(x)
  ref, ref_dropped, _ = naive_moe(layer, cfg, x)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)
  assert float(metrics["dropped"]) == 0.0 == ref_dropped


@pytest.mark.parametrize("act,dtype", [("swiglu", jnp.float32), ("gelu", jnp.float32), ("swiglu", jnp.bfloat16)])
def test_grouped_ffn_values_and_gradients(act, dtype):
  """The fused grouped expert FFN (custom VJP) against autodiff of a per-row reference, with
  empty experts, groups spanning several big chunks, and tails that run into the next group."""
  sizes = (8, 4, 2)
  size_E = jnp.array([0, 13, 1, 20, 0, 3], jnp.int32)
  e, m = size_E.shape[0], int(size_E.sum())
  start_E = jnp.cumsum(size_E) - size_E
  ks = jax.random.split(jax.random.key(0), 5)
  x_PD = jnp.concatenate([jax.random.normal(ks[0], (m, D)), jnp.zeros((max(sizes), D))])
  wact, wlin, wo = (jax.random.normal(ks[1], (e, D, F)) / 4, jax.random.normal(ks[2], (e, D, F)) / 4,
                jax.random.normal(ks[3], (e, F, D)) / 5)
  wlin = wlin if act == "swiglu" else None
  dy = jax.random.normal(ks[4], (m, D))
  f = activation(act)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  x_PD, wact, wo, dy = (a.astype(dtype) for a in (x_PD, wact, wo, dy))
  wlin = None if wlin is None else wlin.astype(dtype)
  expert_M = jnp.repeat(jnp.arange(e), size_E, total_repeat_length=m)

  def ref(x, wact, wlin, wo):  # float32 math, whatever the inputs
    x, wact, wo = (a.astype(jnp.float32) for a in (x, wact, wo))
    wlin = None if wlin is None else wlin.astype(jnp.float32)
    h = f(jnp.einsum("MD,MDF->MF", x[:m], wact[expert_M]))
    if wlin is not None:
      h = h * jnp.einsum("MD,MDF->MF", x[:m], wlin[expert_M])
    return jnp.einsum("MF,MFD->MD", h, wo[expert_M])

  def fused(x, wact, wlin, wo):
    return expert_ffn(x, wact, wlin, wo, start_E, size_E, f, sizes)[:m]
  loss = lambda fn: lambda *w: jnp.sum(fn(*w).astype(jnp.float32) * dy.astype(jnp.float32))
  y, y_ref = jax.jit(fused)(x_PD, wact, wlin, wo), ref(x_PD, wact, wlin, wo)
  assert y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref), atol=tol, rtol=tol)
  args = (x_PD, wact, wlin, wo)
  grads = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2, 3)))(*args)
  grads_ref = jax.grad(loss(ref), argnums=(0, 1, 2, 3))(*args)
  for name, g, g_ref in zip(["x", "wact", "wlin", "wo"], grads, grads_ref):
    if g_ref is None:
      assert g is None
      continue
    assert g.dtype == dtype and float(jnp.max(jnp.abs(g_ref))) > 0, name
    scale = float(jnp.max(jnp.abs(g_ref.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=tol * scale,
                               rtol=tol, err_msg=name)


@pytest.mark.parametrize("impl", ["blocks", "ragged_dot", "capacity_blocks"])
def test_layer_gradients_match_autodiff(impl):
  """Whole layer (router, sorted dispatch, expert FFN, combine; custom VJPs) against plain
  autodiff of the capacity path (batched einsums) with room for every token, for every parameter
  and the input; and the capacity path through the fused FFN against the same reference."""
  x = random_x()
  grads = {}
  cap = dict(dispatch="capacity", capacity_factor=float(E))
  for name, kw in ((impl, dict(moe_impl=impl) if impl != "capacity_blocks" else dict(cap, moe_impl="blocks")),
                   ("ref", dict(cap, moe_impl="ragged_dot"))):
    layer = make_layer(moe_cfg(num_shared_experts=1, **kw))
    g, s = nnx.split(layer)

    def loss(s, x):
      y, m = nnx.merge(g, s)(x)
      return jnp.sum(jnp.sin(y)) + m["aux_loss"] + m["z_loss"]
    grads[name] = jax.grad(loss, argnums=(0, 1))(s, x)
  flat = [jax.tree.leaves(grads[i]) for i in (impl, "ref")]
  assert len(flat[0]) == len(flat[1]) > 5
  for a, b in zip(*flat):
    assert float(jnp.max(jnp.abs(b))) > 0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_tiny_capacity_drops_exactly_the_overflow():
  cfg = moe_cfg(dispatch="capacity", capacity_factor=0.5, gating="softmax_topk")
  layer = make_layer(cfg)
  x = random_x(b=3, t=16)
  capacity = math.ceil(K * 16 / E * 0.5)
  y, metrics = layer(x)
  ref, ref_dropped, kept = naive_moe(layer, cfg, x, capacity=capacity)
  assert ref_dropped > 0.1  # the test exercises real dropping
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  assert abs(float(metrics["dropped"]) - ref_dropped) < 1e-6
  # Tokens with every choice dropped get exactly zero output.
  all_dropped = [(b, t) for b in range(3) for t in range(16) if not any((b, t, j) in kept for j in range(K))]
  assert all_dropped, "expected some fully dropped tokens"
  for b, t in all_dropped:
    assert np.all(np.asarray(y)[b, t] == 0.0)


@pytest.mark.parametrize("mode", ["blocks", "ragged_dot", "capacity", "capacity_einsum"])
def test_upcycling_invariant(mode):
  """All experts = one dense MLP + renormalised gating => MoE == dense, for any router."""
  kw = mode_kw(mode)
  cfg = moe_cfg(gating="topk_softmax", **kw)
  dense = Mlp(D, F, "swiglu", jnp.float32, nnx.Rngs(3))
  x = random_x()
  for seed in range(3):
    layer = make_layer(cfg, seed=seed, router_std=3.0)
    for name in ("wact", "wlin", "wo"):
      dense_w = getattr(dense, f"{name}_DF" if name != "wo" else "wo_FD")[...]
      getattr(layer, f"{name}_EDF" if name != "wo" else "wo_EFD")[...] = jnp.broadcast_to(dense_w, (E,) + dense_w.shape)
    y, _ = layer(x)
    assert float(jnp.max(jnp.abs(y - dense(x)))) <= 1e-6


def test_aux_and_z_loss_formulas():
  # Hand-built router: 4 tokens, 3 experts.
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 0.0]])
  probs = jax.nn.softmax(logits, axis=-1)
  idx = jnp.array([[0], [1], [2], [0]])  # top-1 picks
  aux, z, load, entropy, _ = router_losses(logits, probs, idx)
  f = np.array([2, 1, 1]) / 4.0
  p = np.asarray(probs).mean(0)
  np.testing.assert_allclose(float(aux), 3 * np.sum(f * p), rtol=1e-6)
  lse = np.log(np.exp(np.asarray(logits)).sum(-1))
  np.testing.assert_allclose(float(z), np.mean(lse**2), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(load), f, rtol=1e-6)
  pn = np.asarray(probs)
  np.testing.assert_allclose(float(entropy), np.mean(-(pn * np.log(pn)).sum(-1)), rtol=1e-5)
  # Uniform routing gives the minimum aux loss of 1.
  u = jnp.zeros((6, 3))
  aux_u, *_ = router_losses(u, jax.nn.softmax(u), jnp.array([[0], [1], [2], [0], [1], [2]]))
  np.testing.assert_allclose(float(aux_u), 1.0, rtol=1e-6)


SMALL = dict(vocab_size=259, d_model=32, num_layers=2, num_heads=2, d_ff=64)


@pytest.mark.parametrize("kw", [dict(), dict(moe_layers="all", num_experts=(4, 2), top_k=2),
                                dict(moe_layers=(1,), num_experts=4, top_k=1, dispatch="dropless", tie_embeddings=False)])
def test_causal(kw):
  cfg = ModelConfig(**SMALL, **kw)
  params = tf.init_params(cfg, 0)
  toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  f = jax.jit(lambda p, t: tf.apply(cfg, p, t)[0])
  base = f(params, toks)
  for t in (0, 7, 14):
    pert = toks.at[:, t + 1].set((toks[:, t + 1] + 1) % 256)
    out = f(params, pert)
    assert float(jnp.max(jnp.abs(out[:, : t + 1] - base[:, : t + 1]))) == 0.0
    assert float(jnp.max(jnp.abs(out[:, t + 1] - base[:, t + 1]))) > 0.0


def test_jit_matches_eager_and_params_roundtrip():
  cfg = ModelConfig(**SMALL, moe_layers="every_other", num_experts=4, num_shared_experts=1)
  params = tf.init_params(cfg, 1)
  toks = jax.random.randint(jax.random.key(2), (2, 8), 0, 256)
  eager, aux_e = tf.apply(cfg, params, toks)
  jitted, aux_j = jax.jit(lambda p, t: tf.apply(cfg, p, t))(params, toks)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-5)
  np.testing.assert_allclose(float(aux_e["loss"]), float(aux_j["loss"]), rtol=1e-5)
  again = tf.params_of(tf.model_from_params(cfg, params))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(tf.abstract_params(cfg))
  axes = tf.logical_axes(cfg)
  assert axes["blocks"]["1"]["mlp"]["wact_EDF"] == ("expert", "embed", "mlp")
  assert params["blocks"]["1"]["mlp"]["wact_EDF"].shape == (4, 32, 64)
  assert params["blocks"]["0"]["mlp"]["wact_DF"].shape == (32, 64)


def test_model_from_params_rejects_wrong_shapes_and_keys():
  cfg = ModelConfig(**SMALL)
  params = tf.init_params(cfg, 0)
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad["blocks"]["0"]["mlp"]["wact_DF"] = jnp.zeros((32, 65))
  with pytest.raises(ValueError, match=r"blocks/0/mlp/wact_DF.*\(32, 65\)"):
    tf.model_from_params(cfg, bad)
  del bad["blocks"]["1"]
  with pytest.raises(ValueError, match=r"missing leaves: \['blocks/1/"):
    tf.model_from_params(cfg, bad)


def test_config_validation_and_per_layer_experts():
  cfg = ModelConfig(num_layers=4, moe_layers="every_other", num_experts=(2, 8))
  assert [cfg.experts_in_layer(i) for i in range(4)] == [0, 2, 0, 8]
  assert ModelConfig.from_json(cfg.to_json()) == cfg
  with pytest.raises(ValueError, match="num_experts has 1 entries for 2 MoE layers"):
    ModelConfig(num_layers=4, moe_layers="every_other", num_experts=(2,))
  with pytest.raises(ValueError, match=r"moe_layers \[7\] out of range"):
    ModelConfig(num_layers=4, moe_layers=(7,))
  with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
    ModelConfig.from_dict({"bogus": 1})


def test_expert_choice_is_flagged_and_runs(caplog):
  cfg = moe_cfg(routing="expert_choice", capacity_factor=1.0)
  with caplog.at_level("WARNING"):
    layer = MoeMlp(cfg, E, nnx.Rngs(0))
  assert "NOT causal" in caplog.text
  x = random_x()
  y, m = layer(x)
  # Each expert serves exactly C tokens per sequence: output equals the per-expert weighted sum.
  p = params_np(layer)
  xn = np.asarray(x, np.float64)
  probs = jax.nn.softmax(jnp.einsum("BTD,DE->BTE", x, layer.router_DE[...]) + layer.router_bias_E[...], -1)
  c = math.ceil(K * 12 / E)
  ref = np.zeros_like(xn)
  for b in range(2):
    for e in range(E):
      for t in np.argsort(-np.asarray(probs[b, :, e]), kind="stable")[:c]:
        h = silu(xn[b, t] @ p["wact_EDF"][e]) * (xn[b, t] @ p["wlin_EDF"][e])
        ref[b, t] += float(probs[b, t, e]) * (h @ p["wo_EFD"][e])
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
