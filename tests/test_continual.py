"""EWC building blocks: the diagonal Fisher against an explicit loop over examples, the penalty
against its formula, online accumulation, and the Fisher carried through growth by the ops' rules."""
import inspect
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moegrow.model import transformer as tf
from moegrow.params import trees
from moegrow.surgery import apply as surgery
from moegrow.train import continual, probes
from _tiny import model, moe


def batches(n=2, b=3, t=12):
  text = inspect.getsource(textwrap).encode()[: n * b * (t + 1)]  # real text
  ids = np.frombuffer(text, np.uint8).astype(np.int32).reshape(n, b, t + 1)
  return [{"inputs": x[:, :-1], "targets": x[:, 1:]} for x in ids]


@pytest.mark.parametrize("make", [model, moe], ids=["dense", "moe"])
def test_fisher_equals_a_loop_over_examples(make):
  cfg = make()
  params = tf.init_params(cfg, 0)
  got = probes.fisher_diagonal(cfg, params, batches())

  def nll(p, x, y):  # one example at a time: no vmap
    logits = tf.apply(cfg, p, jnp.asarray(x)[None])[0][0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
  grad = jax.jit(jax.grad(nll))
  want, n = None, 0
  for b in batches():
    for x, y in zip(b["inputs"], b["targets"]):
      sq = {k: np.asarray(v, np.float64) ** 2 for k, v in trees.flatten(grad(params, x, y)).items()}
      want = sq if want is None else {k: want[k] + sq[k] for k in want}
      n += 1
  got = trees.flatten(got)
  assert set(got) == set(want)
  for k in want:
    # rtol 1e-5; float32 rounding of the vmapped vs one-at-a-time gradients also gets an absolute
    # slack of 1e-5 of the leaf's largest entry (tiny entries differ in their last bits)
    np.testing.assert_allclose(np.asarray(got[k]), want[k] / n, rtol=1e-5, atol=1e-5 * want[k].max() / n, err_msg=k)
  assert any(np.asarray(v).max() > 0 for v in got.values())


def test_fisher_with_model_labels_differs_and_needs_a_key():
  cfg = model()
  params = tf.init_params(cfg, 0)
  with pytest.raises(ValueError, match="needs a `key`"):
    probes.fisher_diagonal(cfg, params, batches(), labels="model")
  a = trees.flatten(probes.fisher_diagonal(cfg, params, batches(), labels="model", key=jax.random.key(1)))
  b = trees.flatten(probes.fisher_diagonal(cfg, params, batches()))
  assert any(not np.allclose(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_ewc_penalty_is_its_formula_and_online_fisher_accumulates():
  params = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array([[0.5]])}}
  anchor = {"a": jnp.array([0.0, 4.0]), "b": {"c": jnp.array([[1.5]])}}
  fisher = {"a": jnp.array([3.0, 0.25]), "b": {"c": jnp.array([[2.0]])}}
  # 0.1/2 * (3*1 + 0.25*4 + 2*1) = 0.05 * 6 = 0.3
  assert float(continual.ewc_penalty(params, fisher, anchor, 0.1)) == pytest.approx(0.3, rel=1e-6)
  assert float(continual.ewc_penalty(anchor, fisher, anchor, 0.1)) == 0.0
  acc = continual.online_fisher(fisher, fisher, 0.5)
  np.testing.assert_allclose(np.asarray(acc["a"]), [4.5, 0.375])
  assert continual.online_fisher(None, fisher, 0.5) is fisher


@pytest.mark.parametrize("make, ops, new", [
    (moe, [{"op": "add_experts", "num_experts": 6, "mode": "copy_noise"}],
     {"blocks/1/mlp/wact_EDF": (0, slice(4, 6)), "blocks/1/mlp/router_DE": (1, slice(4, 6))}),
    (model, [{"op": "upcycle", "layers": [1], "num_experts": 4}], {}),
])
def test_fisher_through_growth_is_zero_on_new_slices_and_copied_elsewhere(make, ops, new):
  cfg = make()
  fisher = jax.tree_util.tree_map(lambda x: jnp.abs(x) + 1.0, tf.init_params(cfg, 3))  # all > 0
  grown = trees.flatten(surgery.remap(fisher, cfg, ops, jax.random.key(0), shapes=tf.abstract_params,
                                     kind="fisher"))
  old = trees.flatten(fisher)
  for path, (axis, sl) in new.items():
    x = np.moveaxis(np.asarray(grown[path]), axis, 0)
    assert (x[sl] == 0).all(), path  # new experts and router columns: no importance yet
    np.testing.assert_array_equal(x[:sl.start], np.moveaxis(np.asarray(old[path]), axis, 0))  # copied
  if make is model:  # upcycled: every expert copies the dense MLP's importance, the new router has none
    for e in range(4):
      np.testing.assert_array_equal(np.asarray(grown["blocks/1/mlp/wact_EDF"][e]), np.asarray(old["blocks/1/mlp/wact_DF"]))
    assert (np.asarray(grown["blocks/1/mlp/router_DE"]) == 0).all()
  np.testing.assert_array_equal(np.asarray(grown["blocks/0/attn/wq_DHA"]), np.asarray(old["blocks/0/attn/wq_DHA"]))
