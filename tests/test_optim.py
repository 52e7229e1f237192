"""Optimizer pieces: schedules, freezing masks, Adam-moment surgery."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from moegrow.train import optim


def train_cfg(**kw):
  base = dict(lr=1e-2, steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, b1=0.9, b2=0.95,
              weight_decay=0.0, grad_clip=0.0, seed=0, frozen=())
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_schedules():
  cos = optim.make_schedule(1.0, 100, 10, "cosine", 0.1)
  assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 1.0) < 1e-6 and abs(float(cos(100)) - 0.1) < 1e-6
  assert abs(float(optim.make_schedule(1.0, 100, 10, "constant")(57)) - 1.0) < 1e-6
  rs = optim.make_schedule(1.0, 100, 10, "rsqrt")
  np.testing.assert_allclose([float(rs(s)) for s in (5, 10, 40, 90)], [0.5, 1.0, 0.5, 1 / 3], rtol=1e-6)
  # No fixed end: the same steps give the same rates whatever the run length.
  assert float(optim.make_schedule(1.0, 1000, 10, "rsqrt")(90)) == float(rs(90))
  with pytest.raises(ValueError, match="train.schedule='bogus'"):
    optim.make_schedule(1.0, 100, 10, "bogus")


def test_frozen_params_do_not_move_and_others_do():
  params = {"blocks": {"0": {"mlp": {"wact_EDF": jnp.ones((2, 3, 4))}, "attn": {"wq_DHA": jnp.ones((3, 1, 2))}}}}
  tx = optim.make_optimizer(train_cfg(frozen=("mlp/wact_EDF",), warmup_steps=0), params)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["blocks"]["0"]["mlp"]["wact_EDF"], params["blocks"]["0"]["mlp"]["wact_EDF"])
  assert float(jnp.max(jnp.abs(new["blocks"]["0"]["attn"]["wq_DHA"] - 1.0))) > 0


def test_adam_moments_roundtrip_sets_every_counter():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  tx = optim.make_optimizer(train_cfg(), params)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
  m = optim.adam_moments(state)
  assert int(m["count"]) == 3 and float(m["mu"]["w"][0, 0]) != 0.0
  fresh = tx.init(params)
  mu = jax.tree_util.tree_map(lambda x: x + 5.0, m["mu"])
  out = optim.with_adam_moments(fresh, mu, m["nu"], m["count"])
  m2 = optim.adam_moments(out)
  np.testing.assert_array_equal(m2["mu"]["w"], mu["w"])
  np.testing.assert_array_equal(m2["nu"]["b"], m["nu"]["b"])
  counts = [int(x) for p, x in jax.tree_util.tree_leaves_with_path(out)
            if jax.tree_util.keystr(p).endswith("count")]
  assert counts and all(c == 3 for c in counts)
