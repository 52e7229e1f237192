"""Distilled re-bake (`to_dense`): an exact upcycle comes back exactly; concat_topk keeps the top-k
experts by load (hand-computed MLP); average is the experts' mean; errors; moments; a staged run
that turns a trained MoE into a dense student distilled from it."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow import checkpoint
from moegrow.configs import lm
from moegrow.model import transformer as tf
from moegrow.orchestrate import boundary, parts, stages
from moegrow.params import trees
from moegrow.surgery import apply as surgery
from moegrow.train import steps
from _tiny import model, moe, read_metrics

KEY = jax.random.key(3)


def grow(state, cfg, ops):
  return surgery.apply_ops(state, cfg, ops, KEY, shapes=tf.abstract_params)


def tokens():
  return jnp.asarray(np.arange(2 * 12).reshape(2, 12) * 7 % 250, jnp.int32)


def logits(cfg, params):
  return np.asarray(jax.jit(lambda p: tf.apply(cfg, p, tokens())[0])(params))


def silu(a):
  return a / (1.0 + np.exp(-a))


def expert_np(w, x_ND, e):
  """Expert e of a layer's flat params, by hand: (silu(x Wact) * (x Wlin)) Wo."""
  h = silu(x_ND @ w["wact_EDF"][e]) * (x_ND @ w["wlin_EDF"][e])
  return h @ w["wo_EFD"][e]


def shared_np(w, x_ND):
  return (silu(x_ND @ w["shared/wact_DF"]) * (x_ND @ w["shared/wlin_DF"])) @ w["shared/wo_FD"]


def layer(params, i):
  """{name: array} of layer i's MLP leaves."""
  pre = f"blocks/{i}/mlp/"
  return {p[len(pre):]: np.asarray(v) for p, v in trees.flatten(params).items() if p.startswith(pre)}


def student_mlp(cfg, params, i, x_ND):
  """The dense student's MLP through the model's own layer."""
  mlp = tf.model_from_params(cfg, params).blocks[i].mlp
  return np.asarray(mlp(jnp.asarray(x_ND)[None]))[0]


# ------------------------------------------------------------------ 1. exact upcycle comes back exactly

def test_exact_upcycle_then_concat_topk_is_the_dense_model_and_the_moe():
  cfg = model()
  dense = tf.init_params(cfg, 0)
  up = [dict(op="upcycle", layers="all", num_experts=4, top_k=2, gating="topk_softmax", router_std=0.5)]
  state, moe_cfg, _ = grow({"params": dense}, cfg, up)
  loads = {0: [0.1, 0.4, 0.3, 0.2], "1": [0.0, 0.2, 0.2, 0.6]}  # arbitrary; int or str keys
  out, dense_cfg, (rep,) = grow(state, moe_cfg, [dict(op="to_dense", mode="concat_topk", k=2, loads=loads)])
  assert dense_cfg.moe_layer_ids == () and dense_cfg.d_ff == 2 * cfg.d_ff and not rep["exact"]
  assert rep["kept_experts"] == {"0": [1, 2], "1": [3, 1]}  # by load; the tie 0.2 = 0.2 goes to expert 1
  assert rep["kept"]["blocks/1/mlp/wact_DF"] == ["blocks/1/mlp/wact_EDF[3]", "blocks/1/mlp/wact_EDF[1]"]
  teacher, student, original = logits(moe_cfg, state["params"]), logits(dense_cfg, out["params"]), logits(cfg, dense)
  np.testing.assert_allclose(student, teacher, rtol=0, atol=1e-5)
  np.testing.assert_allclose(student, original, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ 2. concat_topk keeps the right experts

@pytest.mark.parametrize("shared, scale", [(0, 1.0), (1, 3.0)])
def test_concat_topk_is_the_mean_of_the_top_loaded_experts_by_hand(shared, scale):
  # layer 1: 4 distinct random experts (F=24); layer 0 dense at the student's width 2*24 + 8*shared
  cfg = moe(num_shared_experts=shared, d_ff=48 + 8 * shared, expert_output_scale=scale)
  params = tf.init_params(cfg, 1)
  loads = {1: [0.3, 0.1, 0.45, 0.15]}
  out, new_cfg, (rep,) = grow({"params": params}, cfg, [dict(op="to_dense", k=2, loads=loads)])
  assert new_cfg.moe_layer_ids == () and new_cfg.d_ff == cfg.d_ff and rep["kept_experts"] == {"1": [2, 0]}
  w = layer(params, 1)
  x_ND = np.random.default_rng(0).normal(size=(10, cfg.d_model)).astype(np.float32)
  top = sorted(range(4), key=lambda e: -loads[1][e])[:2]
  want = np.zeros((10, cfg.d_model), np.float64)
  for e in top:  # (s/k) sum over the two most loaded experts, one at a time
    want += scale / 2 * expert_np(w, x_ND, e)
  if shared:
    want += shared_np(w, x_ND)  # shared experts: folded in with scale 1
  np.testing.assert_allclose(student_mlp(new_cfg, out["params"], 1, x_ND), want, rtol=1e-4, atol=1e-5)
  for k in layer(params, 0):  # the dense layer and everything else are untouched
    np.testing.assert_array_equal(layer(out["params"], 0)[k], layer(params, 0)[k])


def test_concat_topk_moments_follow_the_kept_experts_and_reset():
  cfg = moe(moe_layers="all", num_shared_experts=0, expert_output_scale=2.0)  # no dense layer: any width
  params = tf.init_params(cfg, 0)
  rng = np.random.default_rng(1)
  mu = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  nu = jax.tree_util.tree_map(lambda x: jnp.asarray(np.abs(rng.normal(size=x.shape)), jnp.float32), params)
  state = {"params": params, "mu": mu, "nu": nu}
  op = dict(op="to_dense", loads={0: [0.4, 0.3, 0.2, 0.1], 1: [0.1, 0.2, 0.3, 0.4]})
  m, v = layer(mu, 1), layer(nu, 1)
  # k=1 keeps expert 3 of layer 1 with wo scale s/k = 2: mu x 2, nu x 4, like a scaled copy
  out, _, _ = grow(state, cfg, [dict(op, k=1)])
  np.testing.assert_allclose(layer(out["mu"], 1)["wo_FD"], 2 * m["wo_EFD"][3], rtol=1e-6)
  np.testing.assert_allclose(layer(out["nu"], 1)["wo_FD"], 4 * v["wo_EFD"][3], rtol=1e-6)
  np.testing.assert_array_equal(layer(out["mu"], 1)["wact_DF"], m["wact_EDF"][3])
  out, _, _ = grow(state, cfg, [dict(op, k=2)])  # experts 3, 2 in that order, wo scale 1
  np.testing.assert_array_equal(layer(out["nu"], 1)["wlin_DF"], np.concatenate([v["wlin_EDF"][3], v["wlin_EDF"][2]], 1))
  np.testing.assert_array_equal(layer(out["nu"], 1)["wo_FD"], np.concatenate([v["wo_EFD"][3], v["wo_EFD"][2]], 0))
  reset, _, _ = grow(state, cfg, [dict(op, k=2, opt_state="reset")])
  assert all(np.all(x == 0) for x in layer(reset["mu"], 1).values())
  k = "blocks/1/attn/wq_DHA"  # leaves the op does not touch keep their moments
  np.testing.assert_array_equal(trees.flatten(reset["mu"])[k], trees.flatten(mu)[k])


# ------------------------------------------------------------------ 3. average, fresh, errors

def test_average_is_the_mean_of_the_experts_and_fresh_is_at_init():
  cfg = moe(d_ff=24 + 8)  # average: width F + shared
  params = tf.init_params(cfg, 2)
  out, new_cfg, (rep,) = grow({"params": params}, cfg, [dict(op="to_dense", mode="average")])
  assert new_cfg.d_ff == 32 and rep["kept_experts"] == {"1": [0, 1, 2, 3]}
  w, got = layer(params, 1), layer(out["params"], 1)
  assert set(got) == {"wact_DF", "wlin_DF", "wo_FD"}  # router, bias, expert tables and shared: gone
  for nm, ax in (("wact", 1), ("wlin", 1)):
    want = np.concatenate([sum(w[f"{nm}_EDF"][e] for e in range(4)) / 4, w[f"shared/{nm}_DF"]], axis=ax)
    np.testing.assert_allclose(got[f"{nm}_DF"], want, rtol=1e-6, atol=1e-7)
  want = np.concatenate([sum(w["wo_EFD"][e] for e in range(4)) / 4, w["shared/wo_FD"]], axis=0)
  np.testing.assert_allclose(got["wo_FD"], want, rtol=1e-6, atol=1e-7)
  # fresh: the model's dense init (N(0, 1/fan_in)), zero moments, nothing copied
  cfg = moe(d_ff=2 * 24 + 8)
  params = tf.init_params(cfg, 2)
  state = {"params": params, "mu": params, "nu": params}
  out, _, _ = grow(state, cfg, [dict(op="to_dense", mode="fresh")])
  got = layer(out["params"], 1)
  assert got["wo_FD"].shape == (56, 16)
  assert abs(got["wact_DF"].std() - 1 / 4) < 0.05 and abs(got["wo_FD"].std() - 1 / np.sqrt(56)) < 0.03
  assert all(np.all(x == 0) for x in layer(out["mu"], 1).values())


def test_errors_name_the_layers():
  cfg = moe(d_ff=56)
  state = {"params": tf.init_params(cfg, 0)}
  with pytest.raises(ValueError, match=r"needs loads=.*for layers \[1\]"):
    grow(state, cfg, [dict(op="to_dense", k=2)])
  with pytest.raises(ValueError, match=r"loads for layer 1 must be a finite vector of 4 \(got shape \(3,\)\)"):
    grow(state, cfg, [dict(op="to_dense", loads={1: [0.5, 0.3, 0.2]})])
  with pytest.raises(ValueError, match=r"dense layers \[0\] have d_ff=32"):
    surgery.grown_config(moe(), [dict(op="to_dense")])
  with pytest.raises(ValueError, match=r"k=5 must be in 1..num_experts"):
    surgery.grown_config(cfg, [dict(op="to_dense", k=5)])
  with pytest.raises(ValueError, match=r"layer\(s\) \[0\] are already dense"):
    surgery.grown_config(cfg, [dict(op="to_dense", layers=[0])])
  with pytest.raises(ValueError, match="mode='bogus'"):
    surgery.grown_config(cfg, [dict(op="to_dense", mode="bogus")])
  # loads are data: the config (what a stage declares) does not need them
  assert surgery.grown_config(cfg, [dict(op="to_dense")]).moe_layer_ids == ()


def test_with_loads_measures_only_for_concat_topk_without_loads():
  calls = []
  measure = lambda: calls.append(1) or {"1": [0.25] * 4}
  ops = boundary.with_loads([dict(op="to_dense", mode="average"), dict(op="to_dense", loads={"1": [1, 0, 0, 0]})],
                           measure)
  assert not calls and "loads" not in ops[0]
  ops = boundary.with_loads([dict(op="to_dense"), dict(op="to_dense", mode="concat_topk", k=1)], measure)
  assert len(calls) == 1 and all(o["loads"] == {"1": [0.25] * 4} for o in ops)


# ------------------------------------------------------------------ 4. the re-bake as a stage

START, END = 2, 4


def rebake_config(data_dir):
  c = lm.get_config("tiny")
  c.data.data_dir = data_dir
  c.data.seq_len = 32
  c.mesh.update(data=1, num_devices=1)
  # one MoE layer; capacity dispatch with batched einsums: the quickest MoE to compile on CPU
  c.model.update(num_layers=1, moe_layers="all", num_experts=4, top_k=2, expert_d_ff=32, d_model=32, d_ff=64,
                 num_heads=2, dispatch="capacity", moe_impl="ragged_dot")
  c.train.update(steps=0, batch_size=8, log_every=1, eval_every=END, eval_batches=1, checkpoint_every=START,
                 keep_checkpoints=4, warmup_steps=1)
  c.stages = (dict(name="moe", steps=START),
              dict(name="dense", steps=END - START, ops=(dict(op="to_dense", mode="concat_topk", k=2),),
                   distill=dict(weight=1.0, temperature=1.0)))
  return c


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_rebake_stage_distils_a_dense_student_from_the_moe(tmp_path, data_dir):
  wd = str(tmp_path / "run")
  c = rebake_config(data_dir)
  result = stages.train_and_evaluate(c, wd)
  assert result["stage"] == 1 and result["step"] == END and not result["stopped_early"]
  plan = parts.resolve_stages(c, parts.model_config(c))
  mesh = parts.make_mesh(c)
  mngr = parts.manager(wd, 1, c.train, read_only=True)
  student_cfg = checkpoint.model_config(checkpoint.read_meta(mngr, END))
  assert student_cfg.moe_layer_ids == () and student_cfg.d_ff == 64 and student_cfg == plan[1].cfg
  # the boundary: loads measured and passed in, the top-2 experts by load concatenated, wo / 2
  cert = json.load(open(os.path.join(wd, "growth", f"{START}.json")))
  loads = cert["ops"][0]["loads"]["0"]
  assert len(loads) == 4 and sum(loads) == pytest.approx(1.0)
  kept = cert["reports"][0]["kept_experts"]["0"]
  assert kept == sorted(range(4), key=lambda e: (-loads[e], e))[:2]
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), mesh)
  grown, _, data_state = checkpoint.restore(mngr, START, prog.abstract_state)
  mngr.close()
  teacher = boundary.teacher_params(wd, plan, plan[1], c.train, mesh)  # stage 0's final MoE
  t, g = layer(jax.device_get(teacher), 0), layer(jax.device_get(grown["params"]), 0)
  np.testing.assert_array_equal(g["wact_DF"], np.concatenate([t["wact_EDF"][e] for e in kept], 1))
  np.testing.assert_allclose(g["wo_FD"], np.concatenate([t["wo_EFD"][e] / 2 for e in kept], 0), rtol=1e-7)
  # the first student step: KL(frozen MoE || grown dense student) on stage 1's first batch, by hand
  it = parts.train_iter(c, *parts.stage_data(c, plan)[1])
  it.set_state(data_state)
  x = jnp.asarray(next(it)["inputs"])
  p = jax.nn.softmax(jax.jit(lambda w: tf.apply(plan[0].cfg, w, x)[0])(teacher), axis=-1)
  log_q = jax.nn.log_softmax(jax.jit(lambda w: tf.apply(plan[1].cfg, w, x)[0])(grown["params"]), axis=-1)
  kl = float(jnp.mean(jnp.sum(p * (jnp.log(p) - log_q), axis=-1)))
  rows = {r["step"]: r for r in read_metrics(wd) if "distill_kl" in r}
  assert sorted(rows) == list(range(START + 1, END + 1))
  assert kl > 1e-4 and rows[START + 1]["distill_kl"] == pytest.approx(kl, rel=1e-4)
  for r in rows.values():  # alpha = 1 and no MoE aux terms left: the loss is the KL alone, finite
    assert np.isfinite(r["distill_kl"]) and r["loss"] == pytest.approx(r["distill_kl"], rel=1e-5)
