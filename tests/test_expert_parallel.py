"""Expert-parallel dropless MoE on 8 simulated CPU devices: each device holds E/ne experts and the
tokens travel (all-gather / reduce-scatter, and ragged all-to-all through its all-gather reference),
against the unsharded layer: outputs, gradients, aux losses; buffers below the worst case drop and
count; growth onto an expert-sharded mesh stays exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moegrow import sharding
from moegrow.config import ModelConfig
from moegrow.model import expert_parallel as ep
from moegrow.model import moe
from moegrow.model import transformer as tf
from moegrow.model.layers import activation
from moegrow.surgery import apply as surgery

E, D, F, K = 8, 16, 32, 2
ROWS = ("data", "expert")


def layer(seed=0, n=96):
  ks = jax.random.split(jax.random.key(seed), 5)
  w = {"wact_EDF": jax.random.normal(ks[0], (E, D, F)) / 4, "wlin_EDF": jax.random.normal(ks[1], (E, D, F)) / 4,
       "wo_EFD": jax.random.normal(ks[2], (E, F, D)) / 4}
  x_ND = jax.random.normal(ks[3], (n, D))
  logits_NE = jax.random.normal(ks[4], (n, E)) * 2
  _, gates_NK, idx_NK = moe.top_k_gates(logits_NE, K, "topk_softmax")
  return w, x_ND, gates_NK, idx_NK


def naive(w, x_ND, gates_NK, idx_NK):
  """y_n = sum_k g_nk * expert_{idx_nk}(x_n), one token at a time (float64 numpy)."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  x, g, idx = np.asarray(x_ND, np.float64), np.asarray(gates_NK, np.float64), np.asarray(idx_NK)
  silu = lambda a: a / (1 + np.exp(-a))
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for j in range(K):
      e = idx[n, j]
      h = silu(x[n] @ w["wact_EDF"][e]) * (x[n] @ w["wlin_EDF"][e])
      y[n] += g[n, j] * (h @ w["wo_EFD"][e])
  return y


def sharded(mesh, fn, impl, factor=0.0, **kw):
  def local(w, x_ND, gates_NK, idx_NK):
    return fn(w, x_ND, gates_NK, idx_NK, activation("swiglu"), impl, "expert", factor, **kw)
  spec = P(ROWS)
  return jax.shard_map(local, mesh=mesh, in_specs=({k: P("expert") for k in ("wact_EDF", "wlin_EDF", "wo_EFD")},
                                                   spec, spec, spec), out_specs=(spec, P()), check_vma=False)


EXCHANGES = {"gather": (ep.gather_dispatch, {}),
             "ragged": (ep.ragged_dispatch, {"a2a": ep.ragged_all_to_all_reference})}


@pytest.mark.parametrize("impl", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("exchange", list(EXCHANGES))
def test_expert_parallel_equals_the_naive_layer_with_gradients(exchange, impl):
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  w, x_ND, gates_NK, idx_NK = layer()
  fn, kw = EXCHANGES[exchange]
  f = sharded(mesh, fn, impl, **kw)
  y_ND, dropped = jax.jit(lambda w, x, g: f(w, x, g, idx_NK))(w, x_ND, gates_NK)
  np.testing.assert_allclose(np.asarray(y_ND), naive(w, x_ND, gates_NK, idx_NK), rtol=1e-5, atol=1e-5)
  assert float(dropped) == 0.0  # the default buffer is the worst case
  loss = lambda fn: (lambda w, x, g: jnp.sum(jnp.sin(fn(w, x, g))))
  ref = jax.jit(jax.grad(loss(lambda w, x, g: moe.dropless_blocks(w, x, g, idx_NK, "swiglu")), argnums=(0, 1, 2)))
  got = jax.jit(jax.grad(loss(lambda w, x, g: f(w, x, g, idx_NK)[0]), argnums=(0, 1, 2)))
  for a, b in zip(jax.tree_util.tree_leaves(got(w, x_ND, gates_NK)), jax.tree_util.tree_leaves(ref(w, x_ND, gates_NK))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exchange", list(EXCHANGES))
def test_small_buffer_drops_exactly_the_overflow_and_counts_it(exchange):
  """All tokens to experts 0 and 1 (chip 0 of the expert axis): a buffer of 1x the balanced share
  keeps the first rows and drops the rest; the count is the hand-computed overflow."""
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  w, x_ND, gates_NK, _ = layer(n=64)
  idx_NK = jnp.tile(jnp.array([[0, 1]], jnp.int32), (64, 1))
  fn, kw = EXCHANGES[exchange]
  y_ND, dropped = jax.jit(sharded(mesh, fn, "blocks", factor=1.0, **kw))(w, x_ND, gates_NK, idx_NK)
  # Per expert group (4 chips of 8 tokens each, K=2): 64 assignments all go to chip 0, whose buffer
  # holds 1.0 x 8 x 2 = 16 rows: 48 of 64 are dropped in each of the 2 groups.
  assert float(dropped) == pytest.approx(48 / 64)
  # Which assignments fit, by hand. Tokens n of one expert group are n % 32 (4 chips x 8).
  # gather: the group's rows sorted by expert, so the 16 rows kept are expert 0's of tokens 0-15;
  # ragged: the receiver's buffer fills sender by sender, so chip 0's own 8 tokens keep both experts.
  one = lambda e: naive(w, x_ND, gates_NK.at[:, 1 - e].set(0.0), idx_NK)  # expert e's gated term alone
  pos = np.arange(64) % 32
  if exchange == "gather":
    want = np.where((pos < 16)[:, None], one(0), 0.0)
  else:
    want = np.where((pos < 8)[:, None], one(0) + one(1), 0.0)
  np.testing.assert_allclose(np.asarray(y_ND), want, rtol=1e-5, atol=1e-5)


def test_buffer_rows():
  assert ep.buffer_rows(8, 2, 4, 0.0) == 64  # worst case: every assignment of the group
  assert ep.buffer_rows(8, 2, 4, 1.0) == 16
  assert ep.buffer_rows(8, 2, 4, 100.0) == 64  # never beyond the worst case


def tiny(num_experts=4, **kw):
  return ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_layers="every_other",
                     num_experts=num_experts, top_k=2, **kw)


def model_loss(cfg, mesh, params, tokens):
  def f(p):
    with sharding.use_mesh(mesh):
      logits, aux = tf.apply(cfg, p, tokens)
    return jnp.mean(logits ** 2) + aux["loss"], aux
  return jax.value_and_grad(f, has_aux=True)(params)


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_model_on_expert_mesh_equals_one_device_and_after_add_experts():
  """The whole model on (data=2, expert=4) with the gather exchange vs one device: loss, aux loss,
  loads and gradients; then add_experts 4 -> 8 onto the same mesh and again."""
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  mesh8 = sharding.make_mesh({"data": 2, "expert": 4})
  mesh1 = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  cfg = tiny(4, expert_exchange="gather")
  params = tf.init_params(cfg, 0)
  for step in range(2):
    (l1, a1), g1 = jax.jit(lambda p: model_loss(cfg, mesh1, p, tokens))(params)
    sh = sharding.tree_shardings(tf.logical_axes(cfg), mesh8, tf.abstract_params(cfg))
    p8 = jax.device_put(params, sh)
    assert p8["blocks"]["1"]["mlp"]["wact_EDF"].addressable_shards[0].data.shape[0] == cfg.experts_in_layer(1) // 4
    (l8, a8), g8 = jax.jit(lambda p: model_loss(cfg, mesh8, p, tokens))(p8)
    assert abs(float(l8) - float(l1)) <= 1e-5 * abs(float(l1))
    np.testing.assert_allclose(float(a8["aux_loss"]), float(a1["aux_loss"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a8["layers"]["1"]["load"]), np.asarray(a1["layers"]["1"]["load"]), atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g8), jax.tree_util.tree_leaves(g1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    if step == 0:  # grow onto the expert-sharded mesh: 4 -> 8 experts (exact: new experts cannot win)
      ops = [{"op": "add_experts", "num_experts": 8}]
      new_cfg = surgery.grown_config(cfg, ops)
      out, _, _ = surgery.apply_ops({"params": p8}, cfg, ops, jax.random.key(2), shapes=tf.abstract_params)
      before = jax.jit(lambda p: tf.apply(cfg, p, tokens)[0])(params)
      with sharding.use_mesh(mesh8):
        after = jax.jit(lambda p: tf.apply(new_cfg, p, tokens)[0])(out["params"])
      np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-5, atol=1e-5)
      cfg, params = new_cfg, jax.device_get(out["params"])
