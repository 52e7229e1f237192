"""Merge methods against hand computations on small trees; identities; errors naming the path."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow.model import transformer as tf
from moegrow.params import trees
from moegrow.surgery import merge as M
from _tiny import moe


def tree(a, b=(1.0, 2.0)):
  return {"w": jnp.asarray(a, jnp.float32), "n": {"b": jnp.asarray(b, jnp.float32)}}


def test_linear_is_the_weighted_average():
  out = M.merge("linear", [tree([1.0, 4.0]), tree([3.0, 0.0])], weights=[1.0, 3.0])
  np.testing.assert_allclose(out["w"], [(1 + 9) / 4, (4 + 0) / 4])
  np.testing.assert_allclose(out["n"]["b"], [1.0, 2.0])
  raw = M.merge("linear", [tree([1.0, 4.0]), tree([3.0, 0.0])], weights=[1.0, 3.0], normalize=False)
  np.testing.assert_allclose(raw["w"], [10.0, 4.0])


def test_task_arithmetic_by_hand():
  base = tree([1.0, 1.0])
  out = M.merge("task_arithmetic", [tree([2.0, 0.0]), tree([1.0, 5.0])], base, weights=[1.0, 0.5], lam=2.0)
  # 1 + 2 * (1 * 1 + 0.5 * 0) = 3;  1 + 2 * (1 * -1 + 0.5 * 4) = 3
  np.testing.assert_allclose(out["w"], [3.0, 3.0])


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean():
  base = tree([0.0, 0.0, 0.0, 0.0], b=(0.0, 0.0))
  t1 = tree([3.0, -1.0, 0.5, 2.0], b=(1.0, 1.0))
  t2 = tree([-2.0, -2.0, 1.0, 0.1], b=(1.0, -3.0))
  out = M.merge("ties", [t1, t2], base, density=0.5)
  # trim to the top 2 magnitudes: t1 -> [3, 0, 0, 2], t2 -> [-2, -2, 0, 0]
  # signs of the sum [1, -2, 0, 2]: [+, -, 0, +]; agreeing entries: [3], [-2], none, [2]
  np.testing.assert_allclose(out["w"], [3.0, -2.0, 0.0, 2.0])
  # b: trim keeps 1 of 2: t1 -> [1, 0] (ties: both 1, the threshold keeps both), t2 -> [0, -3]
  b1 = np.asarray(M.magnitude_mask(jnp.asarray([1.0, 1.0]), 0.5))
  assert b1.all()  # equal magnitudes at the threshold are all kept
  np.testing.assert_allclose(out["n"]["b"], [1.0, -3.0])  # sums [1, -2]: [+, -]


def test_dare_is_unbiased_over_seeds_and_keeps_density():
  base = tree(np.zeros(2000), b=(0.0, 0.0))
  x = tree(np.linspace(-1, 1, 2000), b=(1.0, -1.0))
  outs = [M.merge("dare_linear", [x], base, density=0.3, key=jax.random.key(s))["w"] for s in range(100)]
  kept = np.mean([np.mean(np.asarray(o) != 0) for o in outs])
  assert abs(kept - 0.3) < 0.01
  mean = np.mean(np.stack(outs), axis=0)
  # E[mask / density * x] = x; per entry the mean of 100 draws has sd |x| sqrt(0.7 / 0.3 / 100)
  err = np.abs(mean - np.asarray(x["w"])) / (np.abs(np.asarray(x["w"])) * math.sqrt(0.7 / 0.3 / 100) + 1e-9)
  assert np.mean(err < 4) > 0.998 and abs(np.mean(mean - np.asarray(x["w"]))) < 0.01
  a = M.merge("dare_ties", [x, x], base, density=0.5, key=jax.random.key(1))
  b = M.merge("dare_ties", [x, x], base, density=0.5, key=jax.random.key(1))
  np.testing.assert_array_equal(a["w"], b["w"])  # deterministic given the key


def test_slerp_endpoints_norm_and_lerp_fallback():
  a, b = tree([1.0, 0.0]), tree([0.0, 1.0])
  np.testing.assert_allclose(M.merge("slerp", [a, b], t=0.0)["w"], [1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(M.merge("slerp", [a, b], t=1.0)["w"], [0.0, 1.0], atol=1e-6)
  mid = np.asarray(M.merge("slerp", [a, b], t=0.5)["w"])
  np.testing.assert_allclose(mid, [math.sqrt(0.5)] * 2, rtol=1e-6)  # on the unit circle, unlike lerp
  third = np.asarray(M.merge("slerp", [a, b], t=1 / 3)["w"])
  np.testing.assert_allclose(third, [math.cos(math.pi / 6), math.sin(math.pi / 6)], rtol=1e-6)
  c, d = tree([1.0, 2.0]), tree([2.0, 4.0])  # colinear: lerp
  np.testing.assert_allclose(M.merge("slerp", [c, d], t=0.25)["w"], [1.25, 2.5], rtol=1e-6)
  per_path = M.merge("slerp", [a, b], t=0.0, overrides=[(r"^w$", {"t": 1.0})])
  np.testing.assert_allclose(per_path["w"], [0.0, 1.0], atol=1e-6)  # the override wins for w


def test_model_stock_t_by_hand():
  base = tree([0.0, 0.0], b=(0.0, 0.0))
  x1, x2 = tree([1.0, 0.0], b=(1.0, 0.0)), tree([1.0, 1.0], b=(0.0, 2.0))
  out = M.merge("model_stock", [x1, x2], base)
  cos = 1 / math.sqrt(2)  # angle between (1, 0) and (1, 1)
  t = 2 * cos / (1 + cos)
  np.testing.assert_allclose(out["w"], t * np.array([1.0, 0.5]), rtol=1e-6)
  np.testing.assert_allclose(out["n"]["b"], [0.0, 0.0], atol=1e-7)  # orthogonal: cos 0, t 0 -> the base


@pytest.fixture(scope="module")
def two_models():
  cfg = moe()
  return tf.init_params(cfg, 0), tf.init_params(cfg, 1)


@pytest.mark.parametrize("method, kw", [("linear", {}), ("task_arithmetic", {"weights": [1 / 3] * 3}),
                                        ("ties", {"density": 1.0}), ("dare_ties", {"density": 1.0, "normalize": True}),
                                        ("model_stock", {})])
def test_merging_identical_models_is_the_identity(method, kw, two_models):
  theta, base = two_models
  out = M.merge(method, [theta] * 3, base, **kw)
  for k, v in trees.flatten(theta).items():
    np.testing.assert_allclose(np.asarray(trees.flatten(out)[k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)


def test_slerp_of_a_model_with_itself_is_the_model(two_models):
  theta, _ = two_models
  out = M.merge("slerp", [theta, theta], t=0.3)
  for k, v in trees.flatten(theta).items():
    np.testing.assert_allclose(np.asarray(trees.flatten(out)[k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"w has shape \(3,\) in model 1 but \(2,\) in model 0"):
    M.merge("linear", [tree([1.0, 2.0]), tree([1.0, 2.0, 3.0])])
  with pytest.raises(ValueError, match=r"n/b has dtype bfloat16 in model 1"):
    M.merge("linear", [tree([1.0, 2.0]), {"w": jnp.ones(2), "n": {"b": jnp.ones(2, jnp.bfloat16)}}])
  with pytest.raises(ValueError, match=r"missing \['n/b'\]"):
    M.merge("linear", [tree([1.0, 2.0]), {"w": jnp.ones(2)}])
  with pytest.raises(ValueError, match=r"sum to 0"):
    M.merge("linear", [tree([1.0, 2.0]), tree([1.0, 2.0])], weights=[1.0, -1.0])
  with pytest.raises(ValueError, match=r"needs a base"):
    M.merge("ties", [tree([1.0, 2.0])])
  with pytest.raises(ValueError, match=r"no parameter\(s\) \['tt'\]"):
    M.merge("slerp", [tree([1.0, 2.0])] * 2, tt=0.5)
  with pytest.raises(ValueError, match=r"exactly 2 models"):
    M.merge("slerp", [tree([1.0, 2.0])] * 3)
  with pytest.raises(ValueError, match=r"base differs"):
    M.merge("ties", [tree([1.0, 2.0])], {"w": jnp.ones(2)})


def test_greedy_soup_is_never_worse_than_its_best_ingredient():
  rng = np.random.default_rng(0)
  target = rng.normal(size=8)
  loss = lambda t: float(np.sum((np.asarray(t["w"]) - target) ** 2))
  # ingredients around the target, two of them far off: averaging helps, the far ones are refused
  ings = [tree(target + rng.normal(scale=0.5, size=8)) for _ in range(4)] + [tree(target + 5.0), tree(target - 6.0)]
  soup, trace = M.greedy_soup(ings, loss)
  best = min(loss(x) for x in ings)
  assert loss(soup) <= best
  assert [r["ingredient"] for r in trace][:1] == [int(np.argmin([loss(x) for x in ings]))]
  added = {r["ingredient"] for r in trace if r["added"]}
  assert 4 not in added and 5 not in added and len(added) >= 2
  members = [ings[i] for i in sorted(added)]
  np.testing.assert_allclose(soup["w"], np.mean([np.asarray(m["w"]) for m in members], axis=0), rtol=1e-6)
  soups = [r["soup_loss"] for r in trace if r["added"]]
  assert all(b <= a for a, b in zip(soups, soups[1:]))  # the soup's loss never goes up
