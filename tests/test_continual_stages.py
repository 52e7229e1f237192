"""Continual pre-training as stage options: distillation from the pre-growth model, EWC wired into
stages, replay resumable by domain name, routing drift, and exact resume with all of it on; the
same losses on the 8-device mesh."""
import inspect
import json
import os
import re
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow import checkpoint, data
from moegrow.configs import lm
from moegrow.model import transformer as tf
from moegrow.orchestrate import boundary, parts, stages
from moegrow.orchestrate.validate import ConfigError, validate_config
from moegrow.params import trees
from moegrow.surgery import apply as surgery
from moegrow.train import continual, probes, steps
from _tiny import check_png, moe, read_metrics

OLD = {"shakespeare_plays": 1.0}
NEW = {"python_stdlib": 1.0}
START, END = 3, 7  # stage 0 trains steps 1..3, stage 1 (growth + continual options) steps 4..7


def tokens(b=4, t=16):
  text = inspect.getsource(textwrap).encode()[: b * (t + 1)]  # real text
  ids = np.frombuffer(text, np.uint8).astype(np.int32).reshape(b, t + 1)
  return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}


# ------------------------------------------------------------------ distillation

def test_distill_kl_is_its_formula():
  rng = np.random.default_rng(0)
  t_logits, s_logits = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
  temp = 2.0
  got = np.asarray(continual.distill_kl(jnp.asarray(t_logits), jnp.asarray(s_logits), temp))
  for b in range(2):
    for t in range(3):  # by hand: softmax, then sum p (log p - log q)
      p = np.exp(t_logits[b, t] / temp) / np.exp(t_logits[b, t] / temp).sum()
      q = np.exp(s_logits[b, t] / temp) / np.exp(s_logits[b, t] / temp).sum()
      assert got[b, t] == pytest.approx(float(np.sum(p * (np.log(p) - np.log(q)))), rel=1e-5, abs=1e-7)


def test_distill_after_exact_growth_has_zero_kl_and_the_teacher_matters():
  old_cfg = moe(num_experts=2, top_k=1)
  old = tf.init_params(old_cfg, 0)
  ops = [{"op": "add_experts", "num_experts": 4, "mode": "exact"}]
  grown, new_cfg, _ = surgery.apply_ops({"params": old}, old_cfg, ops, jax.random.key(1), shapes=tf.abstract_params,
                                        jit=True)
  obj = steps.Objective(distill_weight=0.3, temperature=2.0, teacher_cfg=old_cfg)
  batch = tokens()
  loss_fn = jax.jit(lambda p, t: steps.lm_loss(new_cfg, p, batch, objective=obj, ctx={"teacher": t}))
  loss, m = loss_fn(grown["params"], old)
  assert float(m["distill_kl"]) < 1e-6
  # with KL = 0 the loss is (1 - alpha) CE + the MoE terms
  aux = jax.jit(lambda p: tf.apply(new_cfg, p, batch["inputs"])[1]["loss"])(grown["params"])
  assert float(loss) == pytest.approx(0.7 * float(m["ce"]) + float(aux), rel=1e-5)
  other = tf.init_params(old_cfg, 5)  # another teacher: another loss
  loss2, m2 = loss_fn(grown["params"], other)
  assert float(m2["distill_kl"]) > 1e-3 and float(loss2) > float(loss) + 1e-4


def test_distill_replay_only_weights_only_replayed_rows():
  cfg = moe(num_experts=2, top_k=1)
  student, teacher = tf.init_params(cfg, 0), tf.init_params(cfg, 1)
  batch = tokens()
  obj = steps.Objective(distill_weight=1.0, temperature=1.0, distill_replay_only=True, teacher_cfg=cfg)
  none = dict(batch, replay=jnp.zeros((4,)))
  loss0, m0 = steps.lm_loss(cfg, student, none, objective=obj, ctx={"teacher": teacher})
  assert float(loss0) == pytest.approx(float(m0["ce"]) + float(tf.apply(cfg, student, batch["inputs"])[1]["loss"]),
                                       rel=1e-6)  # no replayed row: plain CE
  half = dict(batch, replay=jnp.array([1.0, 0.0, 1.0, 0.0]))
  _, m1 = steps.lm_loss(cfg, student, half, objective=obj, ctx={"teacher": teacher})
  kl = np.asarray(continual.distill_kl(tf.apply(cfg, teacher, batch["inputs"])[0],
                                       tf.apply(cfg, student, batch["inputs"])[0]))
  assert float(m1["distill_kl"]) == pytest.approx(kl[[0, 2]].mean(), rel=1e-5)


# ------------------------------------------------------------------ replay and mixtures by name

def _rows(batches, domain=None):
  return [r.tobytes() for b in batches for r, d in zip(b["inputs"], b["domain"]) if domain is None or d == domain]


def test_a_new_mixture_resumes_shared_domains_by_name_and_mid_stage_exactly(data_dir):
  kw = dict(seq_len=64, global_batch=8, seed=3, data_dir=data_dir)
  a = data.make_sharded_train_iter(OLD, **kw)
  [next(a) for _ in range(5)]
  boundary = json.loads(json.dumps(a.get_state()))
  ref = [next(a) for _ in range(12)]  # stage 0's stream, had it gone on
  replay = data.Replay(OLD, 0.5)
  b = data.make_sharded_train_iter(NEW, replay=replay, **kw)
  b.set_state(data.stage_start(boundary))
  first = [next(b) for _ in range(4)]
  old_id = data.domain_order(NEW, replay).index("shakespeare_plays")
  got = _rows(first, old_id)
  assert got and got == _rows(ref)[:len(got)]  # the replayed domain continues its own stream
  assert all((bt["replay"] == (bt["domain"] == old_id)).all() for bt in first)
  mid = json.loads(json.dumps(b.get_state()))
  expected = [next(b) for _ in range(3)]
  c = data.make_sharded_train_iter(NEW, replay=replay, **kw)
  c.set_state(mid)
  resumed = [next(c) for _ in range(3)]
  for x, y in zip(expected, resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("fraction, ramp", [(0.25, 0), (0.25, 40)])
def test_realised_replay_fraction_matches_the_config(data_dir, fraction, ramp):
  steps_, batch = 60, 32
  replay = data.Replay(OLD, fraction, ramp)
  it = data.make_train_iter(NEW, seq_len=16, global_batch=batch, seed=0, data_dir=data_dir, replay=replay)
  per_step = np.array([next(it)["replay"].mean() for _ in range(steps_)])
  want = np.array([replay.at(s) for s in range(steps_)])
  se = np.sqrt(np.sum(want * (1 - want) * batch)) / (steps_ * batch)
  assert abs(per_step.mean() - want.mean()) < 4 * se
  if ramp:  # ramping: the first third replays clearly less than the last third
    assert per_step[:20].mean() < per_step[40:].mean() - 0.08


# ------------------------------------------------------------------ routing drift

def test_routing_drift_and_load_by_hand():
  choices = np.array([[0, 1], [2, 0], [3, 3], [1, 0]])  # top-2 of 4 tokens
  assert probes.routing_drift(choices, 2) == 0.5  # tokens 1 and 2 include expert 2 or 3
  assert probes.routing_drift(choices, 4) == 0.0
  assert probes.expert_load(choices, 4) == [3 / 8, 2 / 8, 1 / 8, 2 / 8]


def test_router_choices_match_a_hand_computation_on_a_hand_built_router():
  cfg = moe(num_experts=4, top_k=2, num_shared_experts=0)
  params = tf.init_params(cfg, 0)
  w = np.zeros((cfg.d_model, 4), np.float32)
  w[0, 2], w[1, 3], w[2, 0] = 5.0, 4.0, 3.0  # experts 2, 3, 0 follow input features 0, 1, 2
  params["blocks"]["1"]["mlp"]["router_DE"] = jnp.asarray(w)
  params["blocks"]["1"]["mlp"]["router_bias_E"] = jnp.asarray([0.0, 0.5, 0.0, 0.0])
  batch = {k: np.asarray(v) for k, v in tokens().items()}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  got = probes.router_choices(cfg, params, [batch], mesh)["1"]
  h = np.asarray(tf.apply(cfg, params, batch["inputs"], mlp_inputs=True)[1]["mlp_inputs"]["1"]).reshape(-1, cfg.d_model)
  new_tokens = 0
  for n, h_d in enumerate(h):
    logits = [3 * h_d[2], 0.5, 5 * h_d[0], 4 * h_d[1]]  # the router above, written out
    top = sorted(range(4), key=lambda e: -logits[e])[:2]
    assert set(got[n].tolist()) == set(top), n
    new_tokens += any(e >= 2 for e in top)
  assert probes.routing_drift(got, 2) == pytest.approx(new_tokens / len(h))


# ------------------------------------------------------------------ stages: EWC, distillation, replay, resume

def staged(data_dir, mesh=None, **stage1):
  c = lm.get_config("tiny")
  c.data.data_dir = data_dir
  c.mesh.update(mesh or dict(data=1, num_devices=1))
  c.model.update(moe_layers="every_other", num_experts=2, top_k=1, d_model=32, d_ff=64, num_heads=2)
  c.train.update(steps=0, batch_size=8, log_every=1, eval_every=START, eval_batches=1, checkpoint_every=START,
                 keep_checkpoints=8, weight_decay=0.1)
  spec = dict(name="python", steps=END - START, mixture=NEW, ops=(dict(op="add_experts", num_experts=4, mode="exact"),),
              freeze_old_experts=True, replay=dict(fraction=0.25, warmin_steps=2),
              ewc=dict(weight=100.0, batches=2, batch_size=4, gamma=0.5),
              distill=dict(weight=0.5, temperature=2.0))
  spec.update(stage1)
  c.stages = (dict(name="shakespeare", steps=START, mixture=OLD), spec)
  return c


def seeded(src_wd, dst_wd):
  """A fresh workdir holding only `src_wd`'s stage-0 final checkpoint (the run grows from it)."""
  shutil.copytree(os.path.join(src_wd, "checkpoints", str(START)), os.path.join(dst_wd, "checkpoints", str(START)))
  return dst_wd


def final_params(wd, c):
  plan = parts.resolve_stages(c, parts.model_config(c))
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), parts.make_mesh(c))
  mngr = parts.manager(wd, 1, c.train, read_only=True)
  state, _, _ = checkpoint.restore(mngr, END, prog.abstract_state)
  ewc = checkpoint.restore_item(mngr, END, checkpoint.EWC, boundary.ewc_abstract(plan[1].cfg, parts.make_mesh(c)))
  mngr.close()
  return trees.flatten(jax.device_get(state["params"])), trees.flatten(jax.device_get(ewc))


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory, data_dir):
  """One uninterrupted two-stage run with replay, EWC, distillation and frozen old experts."""
  wd = str(tmp_path_factory.mktemp("continual") / "run")
  c = staged(data_dir)
  result = stages.train_and_evaluate(c, wd)
  return wd, c, result


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_first_step_after_exact_growth_has_zero_kl_and_zero_ewc_penalty(continual_run):
  wd, c, _ = continual_run
  rows = {r["step"]: r for r in read_metrics(wd) if "ewc_penalty" in r}
  assert sorted(rows) == list(range(START + 1, END + 1))
  # the first step of stage 1: teacher = the pre-growth model (exact growth) and the params sit
  # on the EWC anchor. Later the student moves away from both.
  assert rows[START + 1]["ewc_penalty"] == 0.0
  assert rows[END]["ewc_penalty"] > 0
  kl = [rows[s]["distill_kl"] for s in range(START + 1, END + 1)]
  assert abs(kl[0]) < 1e-6 and max(kl) > 1e-4


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_ewc_item_fisher_zero_on_new_experts_anchor_is_the_grown_model(continual_run):
  wd, c, _ = continual_run
  _, ewc = final_params(wd, c)
  f = ewc["fisher/blocks/1/mlp/wact_EDF"]
  assert np.all(f[2:] == 0) and f[:2].max() > 0
  assert np.all(ewc["fisher/blocks/1/mlp/router_bias_E"][2:] == 0)
  plan = parts.resolve_stages(c, parts.model_config(c))
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), parts.make_mesh(c))
  mngr = parts.manager(wd, 1, c.train, read_only=True)
  grown, _, _ = checkpoint.restore(mngr, START, prog.abstract_state)
  mngr.close()
  for k, v in trees.flatten(jax.device_get(grown["params"])).items():
    np.testing.assert_array_equal(ewc[f"anchor/{k}"], np.asarray(v, np.float32), err_msg=k)


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_frozen_old_experts_stay_bit_identical_with_ewc_and_distillation(continual_run):
  wd, c, _ = continual_run
  params, ewc = final_params(wd, c)
  for name in ("wact_EDF", "wlin_EDF", "wo_EFD"):
    k = f"blocks/1/mlp/{name}"
    np.testing.assert_array_equal(params[k][:2], ewc[f"anchor/{k}"][:2].astype(params[k].dtype))
  k = "blocks/1/mlp/router_DE"
  np.testing.assert_array_equal(params[k][:, :2], ewc[f"anchor/{k}"][:, :2])


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_forgetting_report_and_heatmap(continual_run):
  wd, c, result = continual_run
  report = json.load(open(os.path.join(wd, "continual", "stage1.json")))
  cert = json.load(open(os.path.join(wd, "growth", f"{START}.json")))
  final = {r["step"]: r for r in read_metrics(wd) if "eval/shakespeare_plays/loss" in r}[END]
  for d in ("shakespeare_plays", "python_stdlib"):
    want = final[f"eval/{d}/loss"] - cert["eval_before"][d]
    assert result["forgetting"][f"forgetting/{d}"] == pytest.approx(want, abs=1e-9)
  assert report["first_new_expert"] == {"1": 2}
  loads = report["routing"]["shakespeare_plays"]["1"]["load"]
  assert len(loads) == 4 and sum(loads) == pytest.approx(1.0)
  check_png(os.path.join(wd, "continual", "stage1_loads.png"))


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_resume_mid_stage_with_ewc_and_distillation_is_bit_identical(continual_run, tmp_path, data_dir):
  wd, c, _ = continual_run
  wd2 = seeded(wd, str(tmp_path / "resumed"))
  c2 = staged(data_dir)
  c2.train.stop_at_step = START + 2  # two steps into stage 1, then a fresh invocation
  r = stages.train_and_evaluate(c2, wd2)
  assert r["step"] == START + 2 and r["stopped_early"]
  c2.train.stop_at_step = 0
  stages.train_and_evaluate(c2, wd2)
  a, ea = final_params(wd, c)
  b, eb = final_params(wd2, c2)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for k in ea:
    np.testing.assert_array_equal(ea[k], eb[k], err_msg=k)


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_eight_device_mesh_gives_the_same_losses(continual_run, tmp_path, data_dir):
  wd, _, _ = continual_run
  """Stage 1 (growth, Fisher, teacher, EWC + distillation + replay + frozen slices) grown from the
  same stage-0 checkpoint on 8 devices (data 4 x fsdp 2) logs the same losses as on 1."""
  c8 = staged(data_dir, mesh=dict(data=-1, fsdp=2, num_devices=8))
  c8.train.stop_at_step = START + 2  # the same schedule; two steps into stage 1
  wd8 = seeded(wd, str(tmp_path / "mesh8"))
  stages.train_and_evaluate(c8, wd8)
  one = {r["step"]: r for r in read_metrics(wd) if "loss" in r}
  eight = {r["step"]: r for r in read_metrics(wd8) if "loss" in r}
  assert sorted(eight) == [START + 1, START + 2]
  for s in eight:
    for k in ("loss", "ce", "ewc_penalty", "distill_kl"):
      assert eight[s][k] == pytest.approx(one[s][k], rel=1e-5, abs=1e-7), (s, k)


def test_continual_options_are_validated_by_name(data_dir):
  for bad, key in [(dict(ewc=dict(weight=-1.0)), "stages[1].ewc.weight"),
                   (dict(ewc=dict(weight=1.0, labels="gold")), "stages[1].ewc.labels"),
                   (dict(replay=dict(fraction=1.5)), "stages[1].replay.fraction"),
                   (dict(distill=dict(weight=0.5, tau=2)), "stages[1].distill"),
                   (dict(replay=None, distill=dict(replay_only=True)), "stages[1].distill.replay_only")]:
    with pytest.raises(ConfigError) as e:
      validate_config(staged(data_dir, **bad), 8)
    assert e.value.key == key, (bad, e.value)


def test_keys_renamed_in_0_6_are_refused_with_their_new_name(data_dir):
  for bad, key, new in [(dict(replay=dict(fraction=0.5, ramp_steps=4)), "stages[1].replay.ramp_steps",
                         "stages[1].replay.warmin_steps"),
                        (dict(ewc=dict(lam=1.0)), "stages[1].ewc.lam", "stages[1].ewc.weight"),
                        (dict(distill=dict(alpha=0.5)), "stages[1].distill.alpha", "stages[1].distill.weight")]:
    with pytest.raises(ConfigError, match=rf"{re.escape(new)} \(renamed in moegrow 0\.6\.0\)") as e:
      validate_config(staged(data_dir, **bad), 8)
    assert e.value.key == key, (bad, e.value)
  # The new names are accepted with the same meaning.
  assert validate_config(staged(data_dir, replay=dict(fraction=0.5, warmin_steps=4)), 8)


def test_ewc_batch_must_split_over_data_shards(data_dir):
  c = staged(data_dir, ewc=dict(weight=1.0, batch_size=3))
  c.data.shards = 2
  with pytest.raises(ConfigError) as e:
    validate_config(c, 8)
  assert e.value.key == "stages[1].ewc.batch_size"
  c.stages = (c.stages[0], dict(c.stages[1], ewc=dict(weight=1.0, batch_size=4)))
  validate_config(c, 8)


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_add_experts_routes_the_new_domain_to_new_experts_from_its_centroid(continual_run, tmp_path, data_dir):
  src, _, _ = continual_run
  c = staged(data_dir)
  grow = dict(op="add_experts", num_experts=3, mode="copy_noise", router_init="hidden", router_domain="python_stdlib")
  c.stages = (c.stages[0], dict(name="python", steps=1, mixture=NEW, ops=(grow,)))
  wd = seeded(src, str(tmp_path / "hidden"))
  r = stages.train_and_evaluate(c, wd)
  cert = r["certificates"][0]
  assert np.shape(cert["ops"][0]["centroids"]["1"]) == (2, 32)  # measured at the boundary, recorded
  plan = parts.resolve_stages(c, parts.model_config(c))
  mesh = parts.make_mesh(c)
  prog = steps.build_program(plan[1].cfg, parts.stage_train(c.train, plan[1]), mesh)
  mngr = parts.manager(wd, 1, c.train, read_only=True)
  state, _, _ = checkpoint.restore(mngr, START, prog.abstract_state)  # the grown checkpoint, before training
  mngr.close()
  evals = parts.eval_sets(c, ["shakespeare_plays", "python_stdlib"])
  to_new = {d: probes.routing_drift(probes.router_choices(plan[1].cfg, state["params"], b, mesh)["1"], 2)
            for d, b in evals.items()}
  assert to_new["python_stdlib"] > 0.5 > to_new["shakespeare_plays"], to_new
