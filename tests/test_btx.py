"""Branch-Train-MiX: identical branches give the seed model exactly; branch e is expert e; the
rest is the branches' mean; hidden-state router columns by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow.model import transformer as tf
from moegrow.params import trees
from moegrow.surgery import btx
from _tiny import model


def tokens():
  return jnp.asarray(np.arange(2 * 12).reshape(2, 12) % 250, jnp.int32)


def test_identical_branches_reproduce_the_seed_model():
  cfg = model()
  seed = tf.init_params(cfg, 0)
  params, new_cfg, report = btx.mix([seed] * 3, cfg, jax.random.key(1), shapes=tf.abstract_params, top_k=2)
  assert new_cfg.experts_in_layer(0) == 3 and new_cfg.gating == "topk_softmax" and report["branches"] == 3
  want = jax.jit(lambda p: tf.apply(cfg, p, tokens())[0])(seed)
  got = jax.jit(lambda p: tf.apply(new_cfg, p, tokens())[0])(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_branch_e_is_expert_e_and_the_rest_is_the_mean():
  cfg = model()
  branches = [tf.init_params(cfg, s) for s in range(2)]
  params, _, _ = btx.mix(branches, cfg, jax.random.key(0), shapes=tf.abstract_params, layers=[1])
  out, src = trees.flatten(params), [trees.flatten(b) for b in branches]
  for e in range(2):
    np.testing.assert_array_equal(out["blocks/1/mlp/wact_EDF"][e], src[e]["blocks/1/mlp/wact_DF"])
    np.testing.assert_array_equal(out["blocks/1/mlp/wo_EFD"][e], src[e]["blocks/1/mlp/wo_FD"])
  for k in ("blocks/0/attn/wq_DHA", "embed_VD", "blocks/0/mlp/wact_DF", "final_norm/scale"):
    if k in out:
      np.testing.assert_allclose(out[k], (src[0][k] + src[1][k]) / 2, rtol=1e-6, err_msg=k)
  router = jnp.eye(cfg.d_model)[:, :2]
  given, _, _ = btx.mix(branches, cfg, jax.random.key(0), shapes=tf.abstract_params, layers=[1], routers={1: router})
  np.testing.assert_array_equal(trees.flatten(given)["blocks/1/mlp/router_DE"], router)
  with pytest.raises(ValueError, match=r"routers\[1\] has shape \(3, 2\)"):
    btx.mix(branches, cfg, jax.random.key(0), shapes=tf.abstract_params, layers=[1], routers={1: jnp.ones((3, 2))})


def test_router_from_centroids_by_hand():
  c = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  r = np.asarray(btx.router_from_centroids(c))
  # column 0: (1, 0) - mean((0, 1), (1, 1)) = (0.5, -1); normalised
  np.testing.assert_allclose(r[:, 0], np.array([0.5, -1.0]) / np.sqrt(1.25), rtol=1e-6)
  np.testing.assert_allclose(r[:, 2], np.array([0.5, 0.5]) / np.sqrt(0.5), rtol=1e-6)
  # centroids around their common mean: each scores highest on its own column
  centred = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  assert list(np.argmax(centred @ np.asarray(btx.router_from_centroids(centred)), axis=1)) == [0, 1, 2]


def test_centred_router_biases_put_the_boundary_between_the_centroids():
  # two centroids pointing the same way: without biases both score highest on the same column
  c = np.array([[3.0, 1.0], [3.0, -0.2]])
  r = np.asarray(btx.router_from_centroids(c))
  b = np.asarray(btx.router_bias_from_centroids(c, r))
  np.testing.assert_allclose(b, -(c.mean(axis=0) @ r), rtol=1e-6)  # b_e = -m . col_e
  assert list(np.argmax(c @ r + b, axis=1)) == [0, 1]
  np.testing.assert_allclose((c.mean(axis=0) @ r + b), 0.0, atol=1e-6)  # all logits equal at the mean
  cfg = model()
  branches = [tf.init_params(cfg, s) for s in range(2)]
  got, _, rep = btx.mix(branches, cfg, jax.random.key(0), shapes=tf.abstract_params, layers=[1],
                        router_biases={1: jnp.asarray([0.5, -0.5])})
  np.testing.assert_array_equal(trees.flatten(got)["blocks/1/mlp/router_bias_E"], [0.5, -0.5])
  assert rep["map"]["blocks/1/mlp/router_bias_E"] == "given"
  with pytest.raises(ValueError, match=r"router_biases\[1\] has shape \(3,\)"):
    btx.mix(branches, cfg, jax.random.key(0), shapes=tf.abstract_params, layers=[1], router_biases={1: jnp.ones(3)})


def test_mlp_input_means_are_the_mean_over_every_token():
  from moegrow.train import probes
  cfg = model()
  params = tf.init_params(cfg, 0)
  rng = np.random.default_rng(0)
  sets = {"a": [{"inputs": rng.integers(0, 250, (2, 8)).astype(np.int32)} for _ in range(2)],
          "b": [{"inputs": rng.integers(0, 250, (2, 8)).astype(np.int32)}]}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  got = probes.mlp_input_means(cfg, params, sets, mesh)
  for d, batches in sets.items():
    h = [np.asarray(tf.apply(cfg, params, jnp.asarray(b["inputs"]), mlp_inputs=True)[1]["mlp_inputs"]["1"])
         for b in batches]
    want = np.concatenate([x.reshape(-1, cfg.d_model) for x in h]).mean(axis=0)
    np.testing.assert_allclose(got["1"][d], want, rtol=1e-5, atol=1e-6)
  assert set(got) == {"0", "1"}
