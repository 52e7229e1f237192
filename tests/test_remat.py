"""Activation rematerialisation (ModelConfig.remat): "block" and "dots" change what the forward keeps
for the backward, never the loss, the gradients or the MoE metrics."""
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from moegrow.config import REMATS, ModelConfig
from moegrow.model import transformer as tf
from moegrow.params import trees

B, T = 2, 32
DENSE = dict(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48)
MOE = dict(DENSE, moe_layers="every_other", num_experts=4, top_k=2, router_jitter=0.1)  # jitter: rng in remat
TOKENS_BT = jnp.asarray(np.random.default_rng(0).integers(0, 259, (B, T + 1)), jnp.int32)
BATCH = {"inputs": TOKENS_BT[:, :-1], "targets": TOKENS_BT[:, 1:]}
RNG = jax.random.PRNGKey(7)


def loss_fn(cfg):
  """LM loss (cross-entropy + the weighted MoE losses, as train.steps.lm_loss) and the per-layer
  MoE metrics."""
  def loss(params):
    logits_BTV, aux = tf.apply(cfg, params, BATCH["inputs"], RNG)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, BATCH["targets"]).mean()
    return ce + aux["loss"], aux["layers"]
  return loss


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_remat_keeps_loss_gradients_and_moe_metrics(kind):
  base = DENSE if kind == "dense" else MOE
  params = tf.init_params(ModelConfig(**base), 0)
  out = {r: jax.jit(jax.value_and_grad(loss_fn(ModelConfig(**base, remat=r)), has_aux=True))(params) for r in REMATS}
  (loss0, layers0), grads0 = out["none"]
  if kind == "moe":
    assert sorted(layers0) == ["1"] and float(layers0["1"]["aux_loss"]) > 0
  for r in ("block", "dots"):
    (loss, layers), grads = out[r]
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    assert jax.tree_util.tree_structure(layers) == jax.tree_util.tree_structure(layers0)  # metrics come out
    for a, b in zip(jax.tree_util.tree_leaves(layers), jax.tree_util.tree_leaves(layers0)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    flat, flat0 = trees.flatten(grads), trees.flatten(grads0)
    assert flat.keys() == flat0.keys()
    for path, g in flat.items():
      w = np.asarray(flat0[path])
      np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-6 * max(1e-3, np.abs(w).max()),
                                 err_msg=f"{r}: {path}")


INSIDE_BLOCK = re.compile(r"\((Attention\.|Mlp\.|causal_attention|rope)|moe\.py|grouped_ffn\.py")


def saved(cfg, params) -> list[tuple[tuple[int, ...], str]]:
  """(shape, description) of what the forward keeps for the backward
  (jax.ad_checkpoint.print_saved_residuals), and the subset computed inside a block's attention or
  MLP (the norms are left out: the final norm is the same RMSNorm)."""
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(lambda p: loss_fn(cfg)(p)[0], params)
  out = []
  for line in buf.getvalue().splitlines():
    m = re.match(r"\w+\[([\d,]*)\] (.*)", line)
    out.append((tuple(int(n) for n in m.group(1).split(",") if n), m.group(2)))
  assert out
  return out, [(shape, what) for shape, what in out if INSIDE_BLOCK.search(what)]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_remat_changes_what_the_forward_saves(kind):
  base = DENSE if kind == "dense" else MOE
  params = tf.init_params(ModelConfig(**base), 0)
  scores = (B, base["num_heads"], T, T)  # attention probabilities [B, H, T, S]
  res = {r: saved(ModelConfig(**base, remat=r), params) for r in REMATS}
  everything, inside = res["none"]
  assert scores in [s for s, _ in inside] and len(inside) > 10
  # block: nothing computed inside a block is kept, only block inputs / outputs (and the weights)
  everything, inside = res["block"]
  assert not inside, inside
  assert sum(s == (B, T, base["d_model"]) and "Block.forward" in w for s, w in everything) == base["num_layers"]
  # dots: only matmul outputs without batch dims (the [N, *] projections); the attention softmax over
  # the batched einsum is recomputed
  everything, inside = res["dots"]
  assert inside and all("output of dot_general" in w for _, w in inside), inside
  assert scores not in [s for s, _ in everything]
  if kind == "dense":
    assert (B * T, base["d_ff"]) in [s for s, _ in inside]  # the MLP's hidden projections


def test_remat_marks_the_compiled_program():
  """jax.checkpoint lowers the recomputation behind optimization barriers: present with remat only."""
  params = tf.abstract_params(ModelConfig(**DENSE))
  text = {r: jax.jit(jax.grad(lambda p, r=r: loss_fn(ModelConfig(**DENSE, remat=r))(p)[0])).lower(params).as_text()
          for r in REMATS}
  assert "optimization_barrier" not in text["none"]
  assert text["block"].count("optimization_barrier") >= DENSE["num_layers"]
  assert text["dots"].count("optimization_barrier") >= DENSE["num_layers"]


@pytest.mark.parametrize("remat", ["none", pytest.param("block", marks=pytest.mark.slow)])  # slow tier: the second
def test_scanned_layers_equal_the_loop(remat):
  """scan_layers: the dense + MoE pairs of a 4-layer model run as one scan over 2 repetitions;
  loss, MoE metrics of every layer, MLP inputs and gradients equal the loop's (same rng per layer)."""
  cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=2, d_ff=64, moe_layers="every_other",
                    num_experts=4, top_k=2, router_jitter=0.1, remat=remat)
  assert tf.scan_period(cfg) == 2 and tf.scan_period(cfg.replace(moe_layers=(1,))) == 0
  params = tf.init_params(cfg, 0)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)

  def run(c):
    def f(p):
      logits, aux = tf.apply(c, p, tokens, jax.random.key(3), mlp_inputs=True)
      return jnp.mean(logits ** 2) + aux["loss"], aux
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  (l0, a0), g0 = run(cfg)
  (l1, a1), g1 = run(cfg.replace(scan_layers=True))
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  assert sorted(a1["layers"]) == ["1", "3"]
  for i in ("1", "3"):
    np.testing.assert_allclose(np.asarray(a1["layers"][i]["load"]), np.asarray(a0["layers"][i]["load"]), atol=1e-7)
  for i in ("0", "1", "2", "3"):
    np.testing.assert_allclose(np.asarray(a1["mlp_inputs"][i]), np.asarray(a0["mlp_inputs"][i]), atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # The compiled program really loops: one while loop over the repetitions.
  text = jax.jit(lambda p: tf.apply(cfg.replace(scan_layers=True), p, tokens)[0]).lower(params).as_text()
  assert "stablehlo.while" in text
