"""Frozen slices: whole leaves or index ranges along an axis (old experts and their router columns
after a growth op) stay bit-identical through AdamW with weight decay and momentum; per-slice
learning-rate multipliers scale exactly their slice's updates."""
import inspect
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from moegrow import checkpoint
from moegrow.configs import lm
from moegrow.model import transformer as tf
from moegrow.orchestrate import parts, stages
from moegrow.train import optim, steps
from _tiny import moe

OLD = 2  # experts 0..1 of layer 1 are "old"


def tokens():
  text = inspect.getsource(textwrap).encode()[:8 * 33]  # real text
  ids = np.frombuffer(text, np.uint8).astype(np.int32).reshape(8, 33)
  return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}


def train_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(lr=1e-2, steps=100, warmup_steps=0, schedule="constant", min_lr_ratio=0.1,
                                             b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=0.0, frozen=()), **kw))


def old_experts(e=OLD):
  """Frozen-slice entries for experts 0..e-1 of the tiny MoE's layer 1 (as after growing e -> 4)."""
  return list(optim.old_expert_slices(moe(num_experts=e), []))


def run(tx, params, n=20, mask_grads=None):
  batch, cfg = tokens(), moe()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: steps.lm_loss(cfg, p, batch)[0])(params)
    if mask_grads is not None:
      grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, mask_grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  for _ in range(n):
    params, state = step(params, state)
  return params


def mlp(params):
  return params["blocks"]["1"]["mlp"]


def test_old_experts_and_router_columns_stay_bit_identical_with_weight_decay():
  cfg = moe()
  p0 = tf.init_params(cfg, 0)
  tx = optim.make_optimizer(train_cfg(frozen=tuple(old_experts())), tf.abstract_params(cfg))
  p1 = run(tx, p0)
  a, b = mlp(p0), mlp(p1)
  for name in ("wact_EDF", "wlin_EDF", "wo_EFD"):
    np.testing.assert_array_equal(np.asarray(b[name][:OLD]), np.asarray(a[name][:OLD]), err_msg=name)
    assert not np.array_equal(np.asarray(b[name][OLD:]), np.asarray(a[name][OLD:])), name  # new experts train
  np.testing.assert_array_equal(np.asarray(b["router_DE"][:, :OLD]), np.asarray(a["router_DE"][:, :OLD]))
  np.testing.assert_array_equal(np.asarray(b["router_bias_E"][:OLD]), np.asarray(a["router_bias_E"][:OLD]))
  assert not np.array_equal(np.asarray(b["router_DE"][:, OLD:]), np.asarray(a["router_DE"][:, OLD:]))
  assert not np.array_equal(np.asarray(p1["blocks"]["0"]["attn"]["wq_DHA"]), np.asarray(p0["blocks"]["0"]["attn"]["wq_DHA"]))


def test_masking_gradients_instead_would_not_freeze():
  """Why updates are masked: zero gradients still move a weight through weight decay."""
  cfg = moe()
  p0 = tf.init_params(cfg, 0)
  mask = jax.tree_util.tree_map(jnp.ones_like, p0)
  mask["blocks"]["1"]["mlp"]["wact_EDF"] = mask["blocks"]["1"]["mlp"]["wact_EDF"].at[:OLD].set(0.0)
  p1 = run(optim.make_optimizer(train_cfg(), tf.abstract_params(cfg)), p0, n=3, mask_grads=mask)
  assert not np.array_equal(np.asarray(mlp(p1)["wact_EDF"][:OLD]), np.asarray(mlp(p0)["wact_EDF"][:OLD]))


def test_lr_scale_scales_exactly_its_slice():
  cfg = moe()
  p0 = tf.init_params(cfg, 0)
  base = run(optim.make_optimizer(train_cfg(), tf.abstract_params(cfg)), p0, n=1)
  entry = {"path": r"blocks/1/mlp/wo_EFD", "axis": 0, "start": 2, "stop": 4, "lr_scale": 0.5}
  scaled = run(optim.make_optimizer(train_cfg(frozen=(entry,)), tf.abstract_params(cfg)), p0, n=1)
  d_base = np.asarray(mlp(base)["wo_EFD"]) - np.asarray(mlp(p0)["wo_EFD"])
  d_scaled = np.asarray(mlp(scaled)["wo_EFD"]) - np.asarray(mlp(p0)["wo_EFD"])
  np.testing.assert_allclose(d_scaled[2:], 0.5 * d_base[2:], rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(d_scaled[:2], d_base[:2])


def test_bad_slice_entries_name_the_problem():
  shapes = tf.abstract_params(moe())
  with pytest.raises(ValueError, match=r"range \[0, 9\) does not fit axis 0 of blocks/1/mlp/wo_EFD \(size 4\)"):
    optim.slice_scales(shapes, [{"path": "wo_EFD", "axis": 0, "stop": 9}])
  with pytest.raises(ValueError, match=r"axis 3 does not exist in blocks/1/mlp/router_DE"):
    optim.slice_scales(shapes, [{"path": "router_DE", "axis": 3}])
  with pytest.raises(ValueError, match=r"move layers"):
    optim.old_expert_slices(moe(), [{"op": "insert_blocks", "positions": [0]}])


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_freeze_old_experts_through_a_growth_stage(tmp_path, data_dir):
  c = lm.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(data=1, num_devices=1)
  c.model.update(moe_layers="every_other", num_experts=2, top_k=1)
  c.train.update(steps=12, checkpoint_every=6, keep_checkpoints=3, eval_every=0, log_every=3, weight_decay=0.1)
  c.stages = (dict(name="moe2", steps=6),
              dict(name="moe4", steps=6, freeze_old_experts=True,
                   ops=(dict(op="add_experts", num_experts=4, mode="copy_noise", noise_std=0.1),)))
  wd = str(tmp_path / "run")
  stages.train_and_evaluate(c, wd)
  plan = parts.resolve_stages(c, parts.model_config(c))
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), parts.make_mesh(c))
  mngr = checkpoint.manager(os.path.join(wd, "checkpoints"), read_only=True, step_prefix="stage1")
  grown, _, _ = checkpoint.restore(mngr, 6, prog.abstract_state)
  final, meta, _ = checkpoint.restore(mngr, 12, prog.abstract_state)
  mngr.close()
  a, b = mlp(jax.device_get(grown["params"])), mlp(jax.device_get(final["params"]))
  for name in ("wact_EDF", "wlin_EDF", "wo_EFD"):
    np.testing.assert_array_equal(b[name][:OLD], a[name][:OLD], err_msg=name)
    assert not np.array_equal(b[name][OLD:], a[name][OLD:]), name
  np.testing.assert_array_equal(b["router_DE"][:, :OLD], a["router_DE"][:, :OLD])
  np.testing.assert_array_equal(b["router_bias_E"][:OLD], a["router_bias_E"][:OLD])
  assert not np.array_equal(b["router_DE"][:, OLD:], a["router_DE"][:, OLD:])
  json.dumps(meta)
