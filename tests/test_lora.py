"""LoRA adapters: exact when added, every expert its own A and B, merge/unmerge, gradients reach
every expert's adapter and only the routed one's."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow import trees
from moegrow import lora
from moegrow.model import transformer as tf
from _tiny import moe

ALPHA = 8.0


def tokens(seed=0, b=4, t=16):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)), jnp.int32)


def lm_loss(cfg, params, x):
  logits = tf.apply(cfg, params, x[:, :-1])[0].astype(jnp.float32)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], axis=-1))


def random_b(adapters, seed=1):
  """Adapters as after training: B non-zero."""
  flat = trees.flatten(adapters)
  rng = np.random.default_rng(seed)
  return trees.unflatten({p: (jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype) if p.endswith("/B") else a)
                          for p, a in flat.items()})


def test_axes_follow_the_shape_suffix():
  assert lora.factor_axes("blocks/0/attn/wq_DHA", (16, 2, 8)) == (1, 16, 16)
  assert lora.factor_axes("blocks/0/attn/wo_HAD", (2, 8, 16)) == (1, 16, 16)
  assert lora.factor_axes("blocks/1/mlp/wact_EDF", (4, 16, 24)) == (4, 16, 24)
  assert lora.factor_axes("blocks/1/mlp/wo_EFD", (4, 24, 16)) == (4, 24, 16)
  assert lora.factor_axes("blocks/0/mlp/wo_FD", (32, 16)) == (1, 32, 16)
  assert lora.factor_axes("blocks/1/mlp/router_DE", (16, 4)) == (1, 16, 4)


def test_adding_adapters_is_exact_and_every_expert_has_its_own():
  cfg = moe()
  params = tf.init_params(cfg, 0)
  ad = lora.init(params, rank=4, key=jax.random.key(0))
  flat = trees.flatten(ad)
  assert flat["blocks/1/mlp/wact_EDF/A"].shape == (4, 16, 4) and flat["blocks/1/mlp/wact_EDF/B"].shape == (4, 4, 24)
  assert flat["blocks/1/mlp/wo_EFD/B"].shape == (4, 4, 16)
  a = np.asarray(flat["blocks/1/mlp/wact_EDF/A"])
  assert not np.allclose(a[0], a[1])  # per-expert A, not one shared matrix
  adapted = {p.rsplit("/", 1)[0] for p in flat}
  want = {p for p in trees.flatten(params) if p.split("/")[-1][0] == "w" and ("/attn/" in p or "/mlp/" in p)}
  assert adapted == want, adapted ^ want  # attention q/k/v/o, dense, shared and expert MLP weights
  x = tokens()
  base = np.asarray(tf.apply(cfg, params, x)[0])
  np.testing.assert_array_equal(np.asarray(tf.apply(cfg, lora.apply(params, ad, ALPHA), x)[0]), base)


def test_merge_is_the_naive_per_expert_sum_and_unmerge_restores():
  cfg = moe()
  params = tf.init_params(cfg, 0)
  ad = random_b(lora.init(params, rank=3, key=jax.random.key(0)))
  merged = trees.flatten(lora.merge(params, ad, ALPHA))
  flat, fa = trees.flatten(params), trees.flatten(ad)
  scale = ALPHA / 3
  w, a, b = (np.asarray(x, np.float64) for x in (flat["blocks/1/mlp/wo_EFD"], fa["blocks/1/mlp/wo_EFD/A"],
                                                fa["blocks/1/mlp/wo_EFD/B"]))
  for e in range(4):  # by hand, expert by expert
    want = w[e] + scale * a[e] @ b[e]
    np.testing.assert_allclose(merged["blocks/1/mlp/wo_EFD"][e], want, rtol=1e-5, atol=1e-6)
  w, a, b = (np.asarray(x, np.float64) for x in (flat["blocks/0/attn/wo_HAD"], fa["blocks/0/attn/wo_HAD/A"],
                                                fa["blocks/0/attn/wo_HAD/B"]))
  want = w.reshape(16, 16) + scale * a[0] @ b[0]  # in = H*A, out = D
  np.testing.assert_allclose(merged["blocks/0/attn/wo_HAD"], want.reshape(2, 8, 16), rtol=1e-5, atol=1e-6)
  back = trees.flatten(lora.unmerge(trees.unflatten(merged), ad, ALPHA))
  for p in flat:
    np.testing.assert_allclose(back[p], flat[p], rtol=0, atol=1e-6, err_msg=p)


def test_every_expert_adapter_learns_and_only_the_routed_expert_learns():
  cfg = moe(num_shared_experts=0, top_k=1)
  params = tf.init_params(cfg, 0)
  x = tokens(b=8, t=32)
  grad = jax.jit(jax.grad(lambda ad, p: lm_loss(cfg, lora.apply(p, ad, ALPHA), x)))
  ad = lora.init(params, rank=4, key=jax.random.key(0))
  g0 = trees.flatten(grad(ad, params))
  assert all(np.abs(np.asarray(v)).max() > 0 for k, v in g0.items() if k.endswith("/B"))  # B = 0: B learns first
  step = jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, ad, trees.unflatten(g0))
  g1 = trees.flatten(grad(step, params))
  for k, v in g1.items():  # after one step every A and B, every expert's slice included, has a gradient
    v = np.asarray(v)
    slices = v if "_E" in k.split("/")[-2] else v[None]
    assert all(np.abs(s).max() > 0 for s in slices), k
  # route every token to expert 2 only: the other experts' adapters get exactly zero gradient
  p = trees.flatten(params)
  p["blocks/1/mlp/router_DE"] = jnp.zeros_like(p["blocks/1/mlp/router_DE"])
  p["blocks/1/mlp/router_bias_E"] = jnp.asarray([0.0, 0.0, 10.0, 0.0], p["blocks/1/mlp/router_bias_E"].dtype)
  g2 = trees.flatten(grad(step, trees.unflatten(p)))
  for name in ("wact_EDF", "wlin_EDF", "wo_EFD"):
    for part in ("A", "B"):
      v = np.asarray(g2[f"blocks/1/mlp/{name}/{part}"])
      assert np.abs(v[2]).max() > 0, (name, part)
      assert not np.any(v[[0, 1, 3]]), (name, part)


def test_bad_adapters_name_the_problem():
  cfg = moe()
  params = tf.init_params(cfg, 0)
  with pytest.raises(ValueError, match=r"pattern\(s\) \['blocks/9/attn/wq_DHA'\] match no parameter"):
    lora.init(params, rank=2, key=jax.random.key(0), patterns=["blocks/9/attn/wq_DHA"])
  ad = lora.init(params, rank=2, key=jax.random.key(0), patterns=[r"blocks/1/mlp/wact_EDF"])
  other = tf.init_params(moe(expert_d_ff=12), 0)
  with pytest.raises(ValueError, match=r"adapter of blocks/1/mlp/wact_EDF has A \(4, 16, 2\), B \(4, 2, 24\)"):
    lora.apply(other, ad, ALPHA)
  with pytest.raises(ValueError, match="rank must be >= 1"):
    lora.init(params, rank=0, key=jax.random.key(0))


# ---------------------------------------------------------------- LoRA as a stage

def _restore(wd, c, stage, step):
  from moegrow import checkpoint
  from moegrow.train import stages, steps
  plan = stages.resolve_stages(c, stages.model_config(c))
  prog = steps.build_program(plan[stage].cfg, stages.stage_train(c.train, plan[stage]), stages.make_mesh(c))
  mngr = stages.manager(wd, stage, c.train, read_only=True)
  state, _, _ = checkpoint.restore(mngr, step, prog.abstract_state)
  mngr.close()
  return jax.device_get(state), plan[stage].cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir):
  from moegrow.train import stages
  from _tiny import train_config
  c = train_config(data_dir, steps=0, eval_every=3, eval_batches=1, checkpoint_every=3, keep_checkpoints=8,
                   log_every=1)
  c.model.update(moe_layers="every_other", num_experts=4, top_k=2)
  c.stages = (dict(name="base", steps=3), dict(name="lora", steps=3, lora=dict(rank=4, alpha=8.0)),
              dict(name="merged", steps=1, ops=(dict(op="merge_lora"),)))
  wd = str(tmp_path_factory.mktemp("lora") / "run")
  return c, wd, stages.train_and_evaluate(c, wd)


def test_a_lora_stage_trains_only_the_adapters(lora_run):
  c, wd, result = lora_run
  add, merge = result["certificates"]
  assert all(v == 0.0 for v in add["loss_change"].values()), add["loss_change"]  # B = 0: exact
  base, _ = _restore(wd, c, 0, 3)
  tuned, cfg = _restore(wd, c, 1, 6)
  assert cfg.lora_rank == 4
  flat_base, flat = trees.flatten(base["params"]), trees.flatten(tuned["params"])
  for p, x in flat_base.items():  # the base is bit-identical after 3 LoRA steps
    np.testing.assert_array_equal(flat[p], x, err_msg=p)
  adapters = {p: v for p, v in flat.items() if p.startswith("lora/")}
  for p, v in adapters.items():  # every adapter trained, every expert's slice of it
    if p.endswith("/B"):
      assert all(np.abs(s).max() > 0 for s in v), p
  # the optimizer state holds adapter-sized leaves only: no base-sized moments
  opt = [np.shape(x) for x in jax.tree_util.tree_leaves(tuned["opt_state"]) if np.ndim(x) > 0]
  ad_shapes = sorted(np.shape(v) for v in adapters.values())
  assert sorted(opt) == sorted(ad_shapes * 2), (len(opt), len(ad_shapes))


def test_merge_lora_gives_the_adapter_model_exactly(lora_run):
  c, wd, result = lora_run
  _, merge = result["certificates"]
  assert all(v == 0.0 for v in merge["loss_change"].values()), merge["loss_change"]
  tuned, cfg = _restore(wd, c, 1, 6)
  merged, cfg2 = _restore(wd, c, 2, 6)
  assert cfg2.lora_rank == 0 and "lora" not in merged["params"]
  x = tokens()
  want = np.asarray(tf.apply(cfg, tuned["params"], x)[0])
  np.testing.assert_array_equal(np.asarray(tf.apply(cfg2, merged["params"], x)[0]), want)
  assert result["step"] == 7 and np.isfinite(result["eval/python_stdlib/loss"])  # and it trains on


def test_growth_refuses_a_model_with_adapters():
  from moegrow.surgery import apply as surgery
  cfg = moe(lora_rank=2)
  with pytest.raises(ValueError, match=r"growth op #0 \(add_experts\): the model carries LoRA adapters .*merge_lora"):
    surgery.grown_config(cfg, [dict(op="add_experts", num_experts=8)])
  with pytest.raises(ValueError, match="already carries adapters"):
    surgery.grown_config(cfg, [dict(op="add_lora", rank=2)])


def test_lora_on_the_eight_device_mesh_gives_the_same_losses(lora_run, tmp_path):
  """The LoRA stage grown from the same stage-0 checkpoint on 8 devices (data 2 x fsdp 2 x
  expert 2: experts and their adapters sharded) logs the same losses as on 1 device."""
  import copy
  import shutil
  from moegrow.train import stages
  from _tiny import read_metrics
  c, wd, _ = lora_run
  c8 = copy.deepcopy(c)
  c8.mesh.update(data=2, fsdp=2, expert=2, num_devices=8)
  c8.train.stop_at_step = 5
  wd8 = str(tmp_path / "mesh8")
  shutil.copytree(os.path.join(wd, "checkpoints", "3"), os.path.join(wd8, "checkpoints", "3"))
  stages.train_and_evaluate(c8, wd8)
  one = {r["step"]: r["loss"] for r in read_metrics(wd) if "loss" in r}
  eight = {r["step"]: r["loss"] for r in read_metrics(wd8) if "loss" in r}
  assert sorted(eight) == [4, 5]
  for s in eight:
    assert eight[s] == pytest.approx(one[s], rel=1e-5), s
