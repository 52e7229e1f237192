"""Growth at checkpoint boundaries (issue: growth): exactness on meshes, optimizer state through
the trainer, resume after growth, offline growth, errors that lose nothing."""
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow import checkpoint, data, sharding
from moegrow.configs import grow as grow_config
from moegrow.model import transformer as tf
from moegrow.orchestrate import boundary, parts, stages
from moegrow.surgery import apply as surgery
from moegrow.train import optim, steps
from test_grow import EXACT, KEY, random_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def staged(data_dir, steps=(6, 6), ops=None, mesh=None, **train_kw):
  c = grow_config.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(mesh or {"data": 1})
  c.mesh.num_devices = int(np.prod([c.mesh[a] for a in sharding.MESH_AXES]))
  c.train.update(dict(dict(log_every=2, eval_every=0, checkpoint_every=100), **train_kw))
  ops = ops or (dict(op="upcycle", layers="every_other", num_experts=8, top_k=2),)
  c.stages = (dict(name="dense", steps=steps[0]), dict(name="moe", steps=steps[1], ops=ops))
  c.train.steps = sum(steps)
  return c


def real_batch(data_dir, n=4, t=64):
  return data.eval_batches("shakespeare_plays", seq_len=t, batch_size=n, num_batches=1, data_dir=data_dir)[0]


def tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(p.encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


MESH_OPS = ["upcycle_topk_softmax_per_layer", "granular_topk_softmax_random_router", "add_experts_exact_most_loaded",
            "insert_blocks", "widen_mlp_all_kinds", "add_heads", "widen_model_tied_moe"]


@pytest.mark.parametrize("name", MESH_OPS)
def test_exact_ops_on_8_device_mesh_with_experts_sharded(name, data_dir):
  make, ops = EXACT[name]
  cfg = make()
  state = random_state(cfg)
  tokens = jnp.asarray(real_batch(data_dir, n=4, t=32)["inputs"])
  before = np.asarray(jax.jit(lambda p, t: tf.apply(cfg, p, t)[0])(state["params"], tokens))
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  new_cfg = surgery.grown_config(cfg, ops)
  p_sh = sharding.tree_shardings(tf.logical_axes(new_cfg), mesh, tf.abstract_params(new_cfg))
  grown = jax.jit(lambda s, k: surgery.apply_ops(s, cfg, ops, k, shapes=tf.abstract_params)[0]["params"], out_shardings=p_sh)(state, KEY)

  def fwd(p, t):
    with sharding.use_mesh(mesh):
      return tf.apply(new_cfg, p, t)[0]
  after = np.asarray(jax.jit(fwd)(grown, tokens))
  np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
  for i in new_cfg.moe_layer_ids:  # experts really are split over the 4-way expert axis
    w = grown["blocks"][str(i)]["mlp"]["wact_EDF"]
    e = new_cfg.experts_in_layer(i)
    want = e // 4 if e % 4 == 0 else e
    assert w.addressable_shards[0].data.shape[0] == want, (i, e, w.sharding)


def test_upcycle_through_trainer_carries_moments_and_next_step_loss(data_dir):
  c = staged(data_dir)
  dense_cfg = parts.model_config(c)
  mesh = sharding.make_mesh({"data": 1})
  dense = steps.build_program(dense_cfg, c.train, mesh)
  it = parts.train_iter(c)
  state = dense.init(jax.random.key(0))
  for _ in range(3):
    state, _ = dense.train_step(state, steps.to_global(dense, next(it)))
  ops = [dict(op="upcycle", layers="every_other", num_experts=4, top_k=2)]
  moe_cfg = surgery.grown_config(dense_cfg, ops)
  moe = steps.build_program(moe_cfg, c.train, mesh)
  m = optim.adam_moments(state["opt_state"])
  grown, _, _ = surgery.apply_ops({"params": state["params"], "mu": m["mu"], "nu": m["nu"]}, dense_cfg, ops, KEY,
                                 shapes=tf.abstract_params)
  opt = optim.with_adam_moments(moe.tx.init(grown["params"]), grown["mu"], grown["nu"], m["count"])
  moe_state = boundary.own_buffers({"params": grown["params"], "opt_state": opt, "step": state["step"]})
  m2 = optim.adam_moments(opt)
  assert int(m2["count"]) == int(m["count"]) == 3
  for kind in ("mu", "nu"):
    dense_w = np.asarray(m[kind]["blocks"]["1"]["mlp"]["wact_DF"])
    assert np.abs(dense_w).sum() > 0
    for e in range(4):
      np.testing.assert_array_equal(np.asarray(m2[kind]["blocks"]["1"]["mlp"]["wact_EDF"][e]), dense_w)
      np.testing.assert_array_equal(np.asarray(m2[kind]["blocks"]["1"]["mlp"]["wo_EFD"][e]),
                                    np.asarray(m[kind]["blocks"]["1"]["mlp"]["wo_FD"]))
  batch = next(it)
  _, md = dense.train_step(jax.tree_util.tree_map(jnp.copy, state), steps.to_global(dense, batch))
  _, mm = moe.train_step(moe_state, steps.to_global(moe, batch))
  assert abs(float(md["ce"]) - float(mm["ce"])) <= 1e-5
  assert float(md["lr"]) == float(mm["lr"])  # the schedule continues: count was kept


def _final_params(workdir, config):
  plan = parts.resolve_stages(config, parts.model_config(config))
  idx, step = parts.latest(workdir, plan, config.train)
  prog = steps.build_program(plan[idx].cfg, config.train, parts.make_mesh(config))
  mngr = parts.manager(workdir, idx, config.train, read_only=True)
  state, meta, _ = checkpoint.restore(mngr, step, prog.abstract_state)
  return idx, step, jax.device_get(state), meta


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_staged_run_killed_after_growth_resumes_without_regrowing(tmp_path, data_dir):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  r = stages.train_and_evaluate(staged(data_dir), a)
  assert r["stage"] == 1 and r["step"] == 12 and len(r["certificates"]) == 1
  cert = r["certificates"][0]
  assert all(abs(v) < 1e-5 for v in cert["loss_change"].values())
  assert json.load(open(os.path.join(a, "growth", "6.json")))["loss_after"] == cert["loss_after"]
  # Stop right after the growth (0 steps left in this invocation's budget), then resume.
  r1 = stages.train_and_evaluate(staged(data_dir, stop_after_steps=6), b)
  assert r1["stopped_early"] and r1["step"] == 6 and len(r1["certificates"]) == 1
  assert os.path.isdir(os.path.join(b, "checkpoints", "stage1_6"))
  cert_file = os.path.join(b, "growth", "6.json")
  stamp = os.stat(cert_file).st_mtime_ns
  r2 = stages.train_and_evaluate(staged(data_dir), b)
  assert "certificates" not in r2  # resumed stage 1: no second growth
  assert os.stat(cert_file).st_mtime_ns == stamp
  ia, sa, state_a, meta_a = _final_params(a, staged(data_dir))
  ib, sb, state_b, meta_b = _final_params(b, staged(data_dir))
  assert (ia, sa) == (ib, sb) == (1, 12)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state_a), jax.tree_util.tree_leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  assert [(l["stage"], [o["op"] for o in l["ops"]]) for l in meta_b["lineage"]] == [(0, []), (1, ["upcycle"])]


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
@pytest.mark.parametrize("src_mesh,dst_mesh", [({"data": 1}, {"data": 2, "expert": 4}), ({"data": 8}, {"data": 1})])
def test_offline_grow_across_meshes(tmp_path, data_dir, src_mesh, dst_mesh):
  src_cfg = staged(data_dir, mesh=src_mesh)
  src = str(tmp_path / "src")
  stages.train_and_evaluate(staged(data_dir, mesh=src_mesh, stop_after_steps=6, steps=(6, 6)), src)
  # The source run is stopped at the end of stage 0 *and grew*; remove its grown checkpoint so
  # `src` holds only the dense one, as a run trained without stages would.
  import shutil
  shutil.rmtree(os.path.join(src, "checkpoints", "stage1_6"))
  digest = tree_digest(os.path.join(src, "checkpoints"))
  dst = str(tmp_path / "dst")
  cert = stages.grow_offline(staged(data_dir, mesh=dst_mesh), src, dst)
  assert tree_digest(os.path.join(src, "checkpoints")) == digest  # source untouched
  assert all(abs(v) < 1e-5 for v in cert["loss_change"].values())
  dst_cfg = staged(data_dir, mesh=dst_mesh)
  idx, step, state, meta = _final_params(dst, dst_cfg)
  assert (idx, step) == (1, 6)
  assert state["params"]["blocks"]["1"]["mlp"]["wact_EDF"].shape[0] == 8
  # Logits of the grown checkpoint equal the dense checkpoint's on a real batch.
  dense_cfg = parts.model_config(src_cfg)
  mngr = checkpoint.manager(os.path.join(src, "checkpoints"), read_only=True)
  dense_state, _, _ = checkpoint.restore(mngr, 6, steps.build_program(dense_cfg, src_cfg.train, sharding.make_mesh({"data": 1})).abstract_state)
  toks = jnp.asarray(real_batch(data_dir)["inputs"])
  before = tf.apply(dense_cfg, dense_state["params"], toks)[0]
  after = tf.apply(parts.resolve_stages(dst_cfg, dense_cfg)[1].cfg, state["params"], toks)[0]
  assert float(jnp.max(jnp.abs(before - after))) <= 1e-5


@pytest.mark.slow  # slow tier: runs the CLI in fresh processes
def test_offline_grow_cli_and_errors(tmp_path, data_dir):
  src = str(tmp_path / "src")
  stages.train_and_evaluate(staged(data_dir, stop_after_steps=6), src)
  dense_step = os.path.join(src, "checkpoints", "6")
  digest = tree_digest(os.path.join(src, "checkpoints"))
  cmd = [sys.executable, "-m", "moegrow.grow", f"--from={dense_step}", "--config=configs/grow.py:tiny",
         f"--config.data.data_dir={data_dir}", "--config.mesh.data=1", "--config.mesh.num_devices=1"]
  ok = subprocess.run(cmd + [f"--workdir={tmp_path / 'cli'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "growth certificate @ step 6" in ok.stdout and "change" in ok.stdout
  assert os.path.isdir(tmp_path / "cli" / "checkpoints" / "stage1_6" / "state")
  # Missing checkpoint.
  bad = subprocess.run(cmd[:3] + [f"--from={tmp_path / 'nope'}"] + cmd[4:] + [f"--workdir={tmp_path / 'x'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "nope does not exist" in bad.stderr
  # A checkpoint of a different model family (a MoE checkpoint where a dense one is expected).
  with pytest.raises(ValueError, match="matches no stage of the config"):
    stages.grow_offline(staged(data_dir), os.path.join(src, "checkpoints", "stage1_6"), str(tmp_path / "y"))
  # Shrinking E and ops on layers that do not exist fail before anything is written.
  with pytest.raises(ValueError, match=r"layer 1 has 8 experts; cannot shrink to 4"):
    parts.resolve_stages(staged(data_dir, ops=(dict(op="upcycle", layers=[1], num_experts=8),
                                                  dict(op="add_experts", num_experts=4))), parts.model_config(staged(data_dir)))
  with pytest.raises(ValueError, match=r"layer\(s\) \[7\] do not exist"):
    parts.resolve_stages(staged(data_dir, ops=(dict(op="upcycle", layers=[7], num_experts=8),)),
                            parts.model_config(staged(data_dir)))
  # A corrupt checkpoint (a copy with its array data removed) names its path.
  import shutil
  corrupt = tmp_path / "corrupt" / "checkpoints"
  shutil.copytree(os.path.join(src, "checkpoints", "6"), corrupt / "6")
  for root, _, files in os.walk(corrupt / "6" / "state"):
    for f in files:
      if f != "_METADATA" and "metadata" not in f.lower() and not f.startswith("_"):
        os.remove(os.path.join(root, f))
  with pytest.raises(ValueError, match=str(corrupt / "6")):
    stages.grow_offline(staged(data_dir), str(corrupt / "6"), str(tmp_path / "z"))
  assert tree_digest(os.path.join(src, "checkpoints")) == digest  # the source never changed


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_three_stages_add_most_loaded_experts_measured_at_the_boundary(tmp_path, data_dir):
  c = staged(data_dir, steps=(4, 4))
  c.stages = (dict(name="dense", steps=4),
              dict(name="moe2", steps=4, ops=(dict(op="upcycle", layers="every_other", num_experts=2, top_k=1),)),
              dict(name="moe4", steps=4, ops=(dict(op="add_experts", num_experts=4, source="most_loaded"),)))
  c.train.steps = 12
  r = stages.train_and_evaluate(c, str(tmp_path / "run"))
  assert r["stage"] == 2 and r["step"] == 12 and len(r["certificates"]) == 2
  for cert in r["certificates"]:
    assert all(abs(v) < 1e-5 for v in cert["loss_change"].values()), cert["loss_change"]
  add = r["certificates"][1]
  loads = add["ops"][0]["loads"]["1"]  # measured on the held-out batches at the boundary
  assert len(loads) == 2 and abs(sum(loads) - 1.0) < 1e-5
  assert add["reports"][0]["sources"]["1"][0] == int(np.argmax(loads))
