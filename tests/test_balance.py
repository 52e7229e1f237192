"""Loss-free load balancing and sigmoid routing (moegrow.params.balance, moegrow.model.moe).

References are hand computations and numpy loops; the DeepSeek-V3 block is transformers'.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _tiny import moe, read_metrics, train_config
from moegrow import sharding
from moegrow.surgery import apply as surgery
from moegrow.config import ModelConfig
from moegrow.model import moe as moe_layer
from moegrow.model import transformer as tf
from moegrow.params import balance
from moegrow.train import optim, steps

KEY = jax.random.key(0)
LF = dict(gating="sigmoid_topk", balance="loss_free", balance_rate=0.01)


def naive_route(logits, bias, k, gating):
  """Per token: the k experts with the highest score + bias; gates from the unbiased scores."""
  idx, gates = [], []
  for z in np.asarray(logits, np.float64):
    if gating == "sigmoid_topk":
      score = 1 / (1 + np.exp(-z))
    elif gating == "softmax_topk":
      score = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    else:
      score = z
    chosen = sorted(np.argsort(-(score + bias), kind="stable")[:k].tolist())
    if gating == "sigmoid_topk":
      g = score[chosen] / score[chosen].sum()
    elif gating == "softmax_topk":
      g = score[chosen]
    else:
      g = np.exp(z[chosen] - z[chosen].max()) / np.exp(z[chosen] - z[chosen].max()).sum()
    idx.append(chosen)
    gates.append(g)
  return np.array(idx), np.array(gates)


@pytest.mark.parametrize("gating", ["sigmoid_topk", "softmax_topk", "topk_softmax"])
def test_the_bias_changes_the_choice_not_the_gates(gating):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 6)).astype(np.float32)
  bias = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.3 if gating != "topk_softmax" else 2.0], np.float32)
  _, g0, i0 = moe_layer.top_k_gates(jnp.asarray(logits), 2, gating)
  _, g1, i1 = moe_layer.top_k_gates(jnp.asarray(logits), 2, gating, jnp.asarray(bias))
  order = lambda i, g: (np.take_along_axis(np.asarray(i), np.argsort(np.asarray(i), 1), 1),
                        np.take_along_axis(np.asarray(g), np.argsort(np.asarray(i), 1), 1))
  for bias_used, (i, g) in ((np.zeros(6), order(i0, g0)), (bias, order(i1, g1))):
    ref_i, ref_g = naive_route(logits, bias_used, 2, gating)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-6)
  changed = np.any(np.sort(np.asarray(i0), 1) != np.sort(np.asarray(i1), 1), axis=1)
  assert 0 < changed.sum() < len(changed)  # the bias moved some choices ...
  same = ~changed  # ... and where the choice is the same, so are the gates (bit for bit)
  np.testing.assert_array_equal(order(i0, g0)[1][same], order(i1, g1)[1][same])


def test_the_update_rule_by_hand():
  b = jnp.array([0.0, 0.5, -0.2, 0.0], jnp.float32)
  load = jnp.array([0.5, 0.25, 0.125, 0.125], jnp.float32)  # mean 0.25
  np.testing.assert_allclose(balance.update(b, load, 0.1), [-0.1, 0.5, -0.1, 0.1], atol=1e-7)


def test_the_sequence_wise_loss_against_a_loop():
  """DeepSeek-V3 eq. 17-20: per sequence, alpha sum_i f_i P_i with f_i = E/(K T) * (tokens choosing
  i) and P_i = mean_t s'_i,t; averaged over sequences."""
  rng = np.random.default_rng(1)
  b, t, e, k = 3, 5, 4, 2
  logits = rng.normal(size=(b * t, e)).astype(np.float32)
  probs, _, idx = moe_layer.top_k_gates(jnp.asarray(logits), k, "sigmoid_topk")
  *_, seq = moe_layer.router_losses(jnp.asarray(logits), probs, idx, seqs=b)
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  s = s / s.sum(-1, keepdims=True)
  total = 0.0
  for j in range(b):
    rows = range(j * t, (j + 1) * t)
    f = [e / (k * t) * sum(i in np.asarray(idx)[r] for r in rows) for i in range(e)]
    p = [np.mean([s[r, i] for r in rows]) for i in range(e)]
    total += sum(fi * pi for fi, pi in zip(f, p)) / b
  assert abs(float(seq) - total) < 1e-5


def _program(cfg, devices):
  from moegrow.configs import lm
  c = lm.get_config("tiny")
  mesh = sharding.make_mesh({"data": devices}, devices=jax.devices()[:devices])
  return steps.build_program(cfg, c.train, mesh), c


@pytest.mark.parametrize("devices", [1, pytest.param(8, marks=pytest.mark.slow)])  # slow tier: mesh equivalence
def test_the_train_step_moves_the_bias_by_the_measured_load_and_the_optimizer_never_does(devices):
  cfg = moe(**LF, seq_aux_loss_weight=1e-3)
  prog, _ = _program(cfg, devices)
  state = prog.init(jax.random.key(0))
  mu = optim.adam_moments(state["opt_state"])["mu"]
  assert isinstance(mu["blocks"]["1"]["mlp"]["selection_bias_E"], optax.MaskedNode)
  tokens = np.random.default_rng(0).integers(0, 259, (8, 17), dtype=np.int32)
  batch = steps.to_global(prog, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  bias = np.zeros(4, np.float32)
  for _ in range(3):
    state, m = prog.train_step(state, batch)
    load = np.asarray(m["moe"]["1"]["load"], np.float32)
    bias = bias + np.float32(0.01) * np.sign(load.mean() - load)
    np.testing.assert_allclose(np.asarray(state["params"]["blocks"]["1"]["mlp"]["selection_bias_E"]), bias,
                               atol=1e-7)
  assert np.abs(bias).max() > 0


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_loss_free_balancing_evens_out_a_skewed_router():
  """A router that sends every token to experts 0 and 1: a few hundred bias updates spread them."""
  cfg = moe(**{**LF, "balance_rate": 0.02}, num_shared_experts=0)
  prog, _ = _program(cfg, 1)
  state = prog.init(jax.random.key(0))
  params = state["params"]
  params["blocks"]["1"]["mlp"]["router_bias_E"] = jnp.array([3.0, 3.0, -3.0, -3.0])
  state = {**state, "params": params}
  tokens = np.random.default_rng(0).integers(0, 259, (8, 17), dtype=np.int32)
  batch = steps.to_global(prog, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  loads = []
  for _ in range(200):
    state, m = prog.train_step(state, batch)
    loads.append(np.asarray(m["moe"]["1"]["load"]))
  assert loads[0].max() / loads[0].mean() > 1.9  # nearly everything on two experts
  assert loads[-1].max() / loads[-1].mean() < 1.3


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_a_run_stopped_mid_way_resumes_bit_identically(tmp_path, data_dir):
  from moegrow.orchestrate import stages
  c = train_config(data_dir, steps=6, eval_every=0, checkpoint_every=3, log_every=1)
  c.model.update(moe_layers="every_other", num_experts=4, top_k=2, **LF)
  one = str(tmp_path / "one")
  stages.train_and_evaluate(c, one)
  c2 = copy.deepcopy(c)
  c2.train.stop_at_step = 3
  two = str(tmp_path / "two")
  stages.train_and_evaluate(c2, two)
  c2.train.stop_at_step = 0
  stages.train_and_evaluate(c2, two)
  a = {r["step"]: r["loss"] for r in read_metrics(one) if "loss" in r}
  b = {r["step"]: r["loss"] for r in read_metrics(two) if "loss" in r}
  assert sorted(a) == sorted(b) == list(range(1, 7)) and a == b


def _with_bias(cfg, seed=0):
  params = tf.init_params(cfg, seed)
  for i in cfg.moe_layer_ids:
    e = cfg.experts_in_layer(i)
    params["blocks"][str(i)]["mlp"][balance.LEAF] = jnp.linspace(-0.05, 0.05, e).astype(jnp.float32)
  return params


def _bias(params, i=1):
  return np.asarray(params["blocks"][str(i)]["mlp"][balance.LEAF])


def _logits(cfg, params):
  return np.asarray(tf.apply(cfg, params, jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 200)[0])


def test_growth_and_shrink_ops_carry_the_bias_as_documented():
  cfg = moe(**LF)
  params = _with_bias(cfg)
  b = _bias(params)
  grow = lambda ops: surgery.apply_ops({"params": params}, cfg, ops, KEY, shapes=tf.abstract_params)
  # add_experts exact: new experts at min(b) - 1, never chosen: the function is unchanged
  (st, cfg2, rep) = grow([{"op": "add_experts", "num_experts": 6}])
  np.testing.assert_array_equal(_bias(st["params"]), np.concatenate([b, [b.min() - 1] * 2]))
  assert rep[0]["exact"]
  np.testing.assert_allclose(_logits(cfg2, st["params"]), _logits(cfg, params), atol=1e-5)
  # copies carry their source's bias
  st, _, _ = grow([{"op": "add_experts", "num_experts": 6, "mode": "copy_noise"}])
  np.testing.assert_array_equal(_bias(st["params"]), np.concatenate([b, b[[0, 1]]]))
  # prune keeps the kept entries; merge takes the usage-weighted mean
  st, _, _ = grow([{"op": "prune_experts", "num_experts": 2, "saliency": "list", "keep": {1: [1, 3]}}])
  np.testing.assert_array_equal(_bias(st["params"]), b[[1, 3]])
  st, _, _ = grow([{"op": "merge_experts", "num_experts": 2, "grouping": "list", "groups": {1: [[0, 2], [1, 3]]},
                    "usage": {1: [1.0, 3.0, 3.0, 1.0]}}])
  np.testing.assert_allclose(_bias(st["params"]), [(b[0] + 3 * b[2]) / 4, (3 * b[1] + b[3]) / 4], atol=1e-7)
  # back to dense: dropped
  st, cfg3, _ = grow([{"op": "to_dense", "mode": "average"}])
  assert balance.LEAF not in st["params"]["blocks"]["1"]["mlp"]
  # a new MoE layer starts unbiased
  dense = cfg.replace(moe_layers="none")
  p0 = tf.init_params(dense, 0)
  st, cfg4, _ = surgery.apply_ops({"params": p0}, dense, [{"op": "upcycle", "num_experts": 4}], KEY,
                                  shapes=tf.abstract_params)
  assert all(np.all(_bias(st["params"], i) == 0) for i in cfg4.moe_layer_ids)


def test_a_pruned_model_grows_again():
  cfg = moe(**LF)
  params = _with_bias(cfg)
  st, cfg2, _ = surgery.apply_ops({"params": params}, cfg, [
      {"op": "prune_experts", "num_experts": 2, "saliency": "list", "keep": {1: [0, 2]}},
      {"op": "add_experts", "num_experts": 4, "mode": "copy_noise"}], KEY, shapes=tf.abstract_params)
  b = _bias(params)
  np.testing.assert_array_equal(_bias(st["params"]), b[[0, 2, 0, 2]])
  assert cfg2.experts_in_layer(1) == 4


def test_misuse_is_refused_by_name():
  with pytest.raises(ValueError, match="balance='loss_free'.*routing='expert_choice'"):
    moe(balance="loss_free", routing="expert_choice")
  with pytest.raises(ValueError, match="balance='nope'"):
    moe(balance="nope")
  with pytest.raises(ValueError, match="sigmoid_topk"):
    surgery.grown_config(moe(**LF), [{"op": "add_experts", "num_experts": 6, "ramp_steps": 4}])


@pytest.mark.slow  # slow tier: against transformers (torch)
def test_sigmoid_routing_with_a_selection_bias_equals_deepseek_v3s_block():
  """transformers' DeepseekV3MoE (n_group = topk_group = 1, norm_topk_prob, routed scaling 2.5, one
  shared expert) on the same weights: router, biased selection (e_score_correction_bias), gates,
  experts and shared expert."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
  d, f, e, k = 16, 24, 8, 2
  hf_cfg = transformers.DeepseekV3Config(hidden_size=d, moe_intermediate_size=f, n_routed_experts=e,
                                         num_experts_per_tok=k, n_group=1, topk_group=1, n_shared_experts=1,
                                         routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu")
  block = ds.DeepseekV3MoE(hf_cfg).float().eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in list(block.parameters()) + [block.gate.e_score_correction_bias]:
      p.copy_(0.3 * torch.randn(p.shape, generator=g))
  cfg = ModelConfig(d_model=d, num_layers=1, num_heads=2, d_ff=f, moe_layers="all", num_experts=e, top_k=k,
                    expert_d_ff=f, num_shared_experts=1, expert_output_scale=2.5, **LF)
  layer = moe_layer.MoeMlp(cfg, e, nnx.Rngs(0))
  t = lambda x: jnp.asarray(x.detach().numpy())
  gate_up = t(block.experts.gate_up_proj)  # [E, 2F, D]
  layer.router_DE[...] = t(block.gate.weight).T
  layer.selection_bias_E[...] = t(block.gate.e_score_correction_bias)
  layer.wact_EDF[...] = jnp.swapaxes(gate_up[:, :f], 1, 2)
  layer.wlin_EDF[...] = jnp.swapaxes(gate_up[:, f:], 1, 2)
  layer.wo_EFD[...] = jnp.swapaxes(t(block.experts.down_proj), 1, 2)
  layer.shared.wact_DF[...] = t(block.shared_experts.gate_proj.weight).T
  layer.shared.wlin_DF[...] = t(block.shared_experts.up_proj.weight).T
  layer.shared.wo_FD[...] = t(block.shared_experts.down_proj.weight).T
  x = torch.randn((2, 12, d), generator=g)
  with torch.no_grad():
    want = block(x).numpy()
  got, _ = layer(jnp.asarray(x.numpy()))
  # the bias really changes DeepSeek's choice on these weights (so the comparison covers it)
  with torch.no_grad():
    _, _, idx_hf = block.gate(x)
    block.gate.e_score_correction_bias.zero_()
    _, _, idx_nobias = block.gate(x)
  assert not torch.equal(idx_hf.sort(-1).values, idx_nobias.sort(-1).values)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
