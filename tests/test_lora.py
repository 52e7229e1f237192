"""LoRA adapters: exact when added, every expert its own A and B, merge/unmerge, gradients reach
every expert's adapter and only the routed one's."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow.model import transformer as tf
from moegrow.params import lora, trees
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
  from moegrow.orchestrate import parts
  from moegrow.train import steps
  plan = parts.resolve_stages(c, parts.model_config(c))
  prog = steps.build_program(plan[stage].cfg, parts.stage_train(c.train, plan[stage]), parts.make_mesh(c))
  mngr = parts.manager(wd, stage, c.train, read_only=True)
  state, _, _ = checkpoint.restore(mngr, step, prog.abstract_state)
  mngr.close()
  return jax.device_get(state), plan[stage].cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data_dir):
  from moegrow.orchestrate import stages
  from _tiny import train_config
  c = train_config(data_dir, steps=0, eval_every=3, eval_batches=1, checkpoint_every=3, keep_checkpoints=8,
                   log_every=1)
  c.model.update(moe_layers="every_other", num_experts=4, top_k=2)
  c.stages = (dict(name="base", steps=3), dict(name="lora", steps=3, lora=dict(rank=4, lora_alpha=8.0)),
              dict(name="merged", steps=1, ops=(dict(op="merge_lora"),)))
  wd = str(tmp_path_factory.mktemp("lora") / "run")
  return c, wd, stages.train_and_evaluate(c, wd)


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
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


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
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


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_lora_on_the_eight_device_mesh_gives_the_same_losses(lora_run, tmp_path):
  """The LoRA stage grown from the same stage-0 checkpoint on 8 devices (data 2 x fsdp 2 x
  expert 2: experts and their adapters sharded) logs the same losses as on 1 device."""
  import copy
  import shutil
  from moegrow.orchestrate import stages
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


# ---------------------------------------------------------------- adapter checkpoints

def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _stored_paths(step_dir):
  import orbax.checkpoint as ocp
  meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
  tree = getattr(meta, "item_metadata", meta)
  return {jax.tree_util.keystr(p, simple=True, separator="/")
          for p, _ in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))}


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_adapter_checkpoints_resume_exactly_next_to_a_pinned_base(lora_run, tmp_path):
  """Interrupted in the LoRA stage with keep_checkpoints=1 and a checkpoint every step: the
  stage's checkpoints after its first hold the adapters only, the base is kept, and the resumed
  run (including the merge_lora growth from an adapter checkpoint) logs the same losses."""
  import copy
  import json
  import shutil
  from moegrow.orchestrate import stages
  from _tiny import read_metrics
  c, wd, _ = lora_run
  c2 = copy.deepcopy(c)
  c2.train.update(checkpoint_every=1, keep_checkpoints=1, stop_at_step=5)
  wd2 = str(tmp_path / "resumed")
  shutil.copytree(os.path.join(wd, "checkpoints", "3"), os.path.join(wd2, "checkpoints", "3"))
  stages.train_and_evaluate(c2, wd2)
  ck = os.path.join(wd2, "checkpoints")
  assert sorted(d for d in os.listdir(ck) if d.startswith("stage1")) == ["stage1_3", "stage1_5"]  # base pinned
  stored = _stored_paths(os.path.join(ck, "stage1_5"))
  assert stored and all(p.startswith(("params/lora/", "opt_state", "step")) for p in stored), sorted(stored)[:5]
  assert not any(p.startswith("params/blocks") for p in stored)
  # smaller on disk than the base (for this tiny model, rank-4 adapters with their moments are
  # about half of it; Orbax's per-array metadata makes the exact ratio vary between runs)
  assert _dir_bytes(os.path.join(ck, "stage1_5", "state")) < _dir_bytes(os.path.join(ck, "stage1_3", "state"))
  with open(os.path.join(ck, "stage1_5", "meta", "metadata")) as f:
    ad = json.load(f)["adapters"]
  assert (ad["rank"], ad["lora_alpha"], ad["base"]["checkpoint"], ad["base"]["step"]) == (4, 8.0, "stage1_3", 3)
  c2.train.stop_at_step = 0
  stages.train_and_evaluate(c2, wd2)
  one = {r["step"]: r["loss"] for r in read_metrics(wd) if "loss" in r}
  two = {r["step"]: r["loss"] for r in read_metrics(wd2) if "loss" in r}
  assert sorted(two) == [4, 5, 6, 7]
  assert all(two[s] == one[s] for s in two), (one, two)  # bit-identical losses, merge stage included


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_adapters_refuse_a_different_base(lora_run, tmp_path):
  """The adapters' base replaced by another model (one weight changed): restoring them is an
  error naming both checkpoints; the genuine pair restores."""
  import shutil
  from moegrow import checkpoint
  from moegrow.orchestrate import parts
  from moegrow.train import steps
  c, wd, _ = lora_run
  ck = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(wd, "checkpoints"), ck)
  plan = parts.resolve_stages(c, parts.model_config(c))
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), parts.make_mesh(c))
  mngr = checkpoint.manager(ck, read_only=True, step_prefix="stage1")
  state, meta, _ = checkpoint.restore(mngr, 6, prog.abstract_state)  # adapters + their base
  base, base_meta, data_state = checkpoint.restore(mngr, 3, prog.abstract_state)
  mngr.close()
  np.testing.assert_array_equal(state["params"]["embed_VD"], base["params"]["embed_VD"])
  assert "adapters" in meta and "adapters" not in base_meta
  other = jax.tree_util.tree_map(lambda x: x, base)
  other["params"] = dict(base["params"], embed_VD=base["params"]["embed_VD"] * 1.01)
  shutil.rmtree(os.path.join(ck, "stage1_3"))
  writer = checkpoint.manager(ck, async_save=False, step_prefix="stage1")
  checkpoint.save(writer, 3, other, base_meta, data_state)
  writer.close()
  mngr = checkpoint.manager(ck, read_only=True, step_prefix="stage1")
  with pytest.raises(ValueError, match=r"stage1_6: its adapters were trained on base stage1_3 .* but .*stage1_3 holds "
                                       r"a different base"):
    checkpoint.restore(mngr, 6, prog.abstract_state)
  mngr.close()


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_a_corrupt_base_of_adapters_is_refused_naming_it(lora_run, tmp_path):
  """Flipped bytes in the adapters' base: restoring the adapter checkpoint names the base and the
  parameter (its checksums, not only its fingerprint, are checked)."""
  import shutil
  from moegrow import checkpoint
  from moegrow.orchestrate import parts
  from moegrow.train import steps
  from test_integrity import corrupt
  c, wd, _ = lora_run
  ck = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(wd, "checkpoints"), ck)
  corrupt(os.path.join(ck, "stage1_3"), "flip")
  plan = parts.resolve_stages(c, parts.model_config(c))
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), parts.make_mesh(c))
  mngr = checkpoint.manager(ck, read_only=True, step_prefix="stage1")
  # flipped compressed bytes: wrong values (checksums differ) or an undecodable chunk, by the layout
  with pytest.raises(checkpoint.CorruptCheckpoint,
                     match=r"stage1_3( is corrupt: 1 array\(s\) differ .*state/|: restore failed, its array files are "
                           r"unreadable)"):
    checkpoint.restore(mngr, 6, prog.abstract_state)
  mngr.close()


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_seeding_a_workdir_from_adapters_brings_their_base(lora_run, tmp_path):
  from moegrow import checkpoint
  from moegrow.orchestrate import parts
  from moegrow.train import steps
  c, wd, _ = lora_run
  plan = parts.resolve_stages(c, parts.model_config(c))
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), parts.make_mesh(c))
  src = os.path.join(wd, "checkpoints", "stage1_6")
  new = str(tmp_path / "seeded")
  assert checkpoint.seed_workdir(src, new, 6)
  assert sorted(os.listdir(os.path.join(new, "checkpoints"))) == ["6", "base-stage1_3"]
  assert checkpoint.locate(new)[2] == 6  # the copied base is not taken for a step of the run
  mngr = checkpoint.manager(os.path.join(new, "checkpoints"), read_only=True)
  state, _, _ = checkpoint.restore(mngr, 6, prog.abstract_state)
  mngr.close()
  want, _ = _restore(wd, c, 1, 6)
  for p, x in trees.flatten(want["params"]).items():
    np.testing.assert_array_equal(trees.flatten(jax.device_get(state["params"]))[p], x, err_msg=p)


def test_task_arithmetic_on_adapters_is_the_sum_of_their_products():
  """Two adapter sets (different ranks and alphas) combined by task arithmetic: each weight is
  W + lam * sum_i (alpha_i / r_i) A_i B_i, computed here with numpy per expert."""
  from moegrow.surgery.lora_ops import merge_adapters
  cfg = moe()
  params = tf.init_params(cfg, 0)
  ad1 = random_b(lora.init(params, rank=2, key=jax.random.key(1)), seed=2)
  ad2 = random_b(lora.init(params, rank=4, key=jax.random.key(3), patterns=(r"blocks/\d+/attn/w.*",)), seed=4)
  got = trees.flatten(merge_adapters("task_arithmetic", params, [ad1, ad2], [4.0, 2.0], lam=0.5))
  want = {p: np.asarray(w, np.float64) for p, w in trees.flatten(params).items()}
  for ad, alpha in ((ad1, 4.0), (ad2, 2.0)):
    flat = trees.flatten(ad)
    for p in {q.rsplit("/", 1)[0] for q in flat}:
      a, b = np.asarray(flat[p + "/A"], np.float64), np.asarray(flat[p + "/B"], np.float64)
      prod = np.stack([a[e] @ b[e] for e in range(a.shape[0])]).reshape(want[p].shape)
      want[p] = want[p] + 0.5 * alpha / a.shape[-1] * prod
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_allclose(np.asarray(got[p], np.float64), want[p], atol=2e-6, err_msg=p)
  assert not np.allclose(got["blocks/0/attn/wq_DHA"], params["blocks"]["0"]["attn"]["wq_DHA"])
  with pytest.raises(ValueError, match="2 adapter sets but 3 lora_alpha values"):
    merge_adapters("ties", params, [ad1, ad2], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="'slerp' does not merge task vectors"):
    merge_adapters("slerp", params, [ad1, ad2], 1.0)


def test_lora_dropout_is_refused_with_the_reason():
  from moegrow.orchestrate import validate
  cfg = moe()
  ops, frozen = validate.lora_stage(dict(rank=2, dropout=0.0), cfg, (), (), 1)
  assert ops == (dict(op="add_lora", rank=2),) and frozen == (validate.BASE_FROZEN,)
  with pytest.raises(ValueError, match=r"stages\[1\]\.lora\.dropout=0\.1: LoRA dropout is not supported.*folded"):
    validate.lora_stage(dict(rank=2, dropout=0.1), cfg, (), (), 1)


def test_lora_alpha_under_its_old_name_is_refused_with_the_new_one():
  from moegrow.orchestrate import validate
  from moegrow.surgery import apply as surgery
  with pytest.raises(ValueError, match=r"stages\[1\]\.lora\.alpha.*stages\[1\]\.lora\.lora_alpha \(renamed"):
    validate.lora_stage(dict(rank=2, alpha=4.0), moe(), (), (), 1)
  with pytest.raises(ValueError, match=r"add_lora: argument\(s\) renamed in moegrow 0\.6\.0: alpha is now lora_alpha"):
    surgery.grown_config(moe(), [dict(op="add_lora", rank=2, alpha=4.0)])
  ops, _ = validate.lora_stage(dict(rank=2, lora_alpha=4.0), moe(), (), (), 1)
  assert surgery.grown_config(moe(), list(ops)).lora_alpha == 4.0


def test_a_stage_can_grow_and_add_adapters_at_one_boundary():
  """stage 1 = add_experts 4 -> 8 (exact) + lora: the adapters sit on the grown model, every
  expert (old and new) has its own, and the boundary is exact (logits equal the old model's)."""
  import ml_collections
  from moegrow.orchestrate import parts
  from moegrow.surgery import apply as surgery
  cfg = moe()
  c = ml_collections.ConfigDict({"train": {"steps": 0}})
  c.stages = (dict(name="a", steps=1), dict(name="b", steps=1, ops=(dict(op="add_experts", num_experts=8),),
                                           lora=dict(rank=2)))
  st = parts.resolve_stages(c, cfg)[1]
  assert [o["op"] for o in st.ops] == ["add_experts", "add_lora"] and st.cfg.lora_rank == 2
  assert st.cfg.num_experts == 8 and parts.adapter_stage(st)
  params = tf.init_params(cfg, 0)
  grown, new_cfg, _ = surgery.apply_ops({"params": params}, cfg, st.ops, jax.random.key(1), shapes=tf.abstract_params)
  assert new_cfg == st.cfg
  assert trees.flatten(grown["params"]["lora"])["blocks/1/mlp/wact_EDF/A"].shape == (8, 16, 2)
  x = tokens()
  np.testing.assert_allclose(np.asarray(tf.apply(new_cfg, grown["params"], x)[0]),
                             np.asarray(tf.apply(cfg, params, x)[0]), atol=1e-5)
