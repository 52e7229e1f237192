"""Ramped growth (MSG, Yao et al. 2024; moegrow.params.ramp): with ramp_steps the new units are random and
sit behind a mask m = 0 -> 1. At m = 0 the grown model is the old one, at m = 1 the plain grown
model, at m = 0.5 a model with the new output slices halved (router bias + log 0.5) built by hand;
the trainer advances m with the step, checkpoints it and resumes mid-ramp bit-identically."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.params import ramp, trees
from moegrow.surgery import apply as surgery
from moegrow.surgery.shape_ops import add_heads
from _tiny import model, moe, read_metrics

KEY = jax.random.PRNGKey(3)
_apply = jax.jit(tf.apply, static_argnums=0)
X = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)

# op -> (old config, op spec, the new units' masked slices BY HAND:
#         [(kind, path, index tuple into the leaf)] and other leaves/slices that must be new and random)
H = slice(None)
CASES = {
    "add_experts": (moe, dict(op="add_experts", num_experts=8, ramp_steps=4),
                    [("logbias", "blocks/1/mlp/router_bias_E", (slice(4, 8),))],
                    [("blocks/1/mlp/wact_EDF", (slice(4, 8),)), ("blocks/1/mlp/wlin_EDF", (slice(4, 8),)),
                     ("blocks/1/mlp/wo_EFD", (slice(4, 8),)), ("blocks/1/mlp/router_DE", (H, slice(4, 8)))]),
    "insert_blocks_moe": (moe, dict(op="insert_blocks", positions=[1], num_experts=4, ramp_steps=4),
                          [("scale", "blocks/1/attn/wo_HAD", (H,)), ("scale", "blocks/1/mlp/wo_EFD", (H,)),
                           ("scale", "blocks/1/mlp/shared/wo_FD", (H,))],
                          [("blocks/1/attn/wq_DHA", (H,)), ("blocks/1/mlp/wact_EDF", (H,))]),
    "insert_blocks_dense": (model, dict(op="insert_blocks", positions=[0, 2], ramp_steps=3),
                            [("scale", "blocks/0/attn/wo_HAD", (H,)), ("scale", "blocks/0/mlp/wo_FD", (H,)),
                             ("scale", "blocks/2/attn/wo_HAD", (H,)), ("scale", "blocks/2/mlp/wo_FD", (H,))],
                            [("blocks/2/mlp/wlin_DF", (H,))]),
    "widen_mlp": (moe, dict(op="widen_mlp", d_ff=48, expert_d_ff=40, shared_d_ff=12, ramp_steps=4),
                  [("scale", "blocks/0/mlp/wo_FD", (slice(32, 48),)),
                   ("scale", "blocks/1/mlp/wo_EFD", (H, slice(24, 40))),
                   ("scale", "blocks/1/mlp/shared/wo_FD", (slice(8, 12),))],
                  [("blocks/0/mlp/wact_DF", (H, slice(32, 48))), ("blocks/0/mlp/wlin_DF", (H, slice(32, 48))),
                   ("blocks/1/mlp/wact_EDF", (H, H, slice(24, 40))), ("blocks/1/mlp/shared/wlin_DF", (H, slice(8, 12)))]),
    "widen_mlp_gelu": (lambda: model(mlp_act="gelu", tie_embeddings=False),
                       dict(op="widen_mlp", d_ff=40, ramp_steps=2),
                       [("scale", "blocks/0/mlp/wo_FD", (slice(32, 40),)),
                        ("scale", "blocks/1/mlp/wo_FD", (slice(32, 40),))],
                       [("blocks/1/mlp/wact_DF", (H, slice(32, 40)))]),
    "add_heads": (moe, dict(op="add_heads", num_heads=3, ramp_steps=4),
                  [("scale", "blocks/0/attn/wo_HAD", (slice(2, 3),)), ("scale", "blocks/1/attn/wo_HAD", (slice(2, 3),))],
                  [("blocks/0/attn/wq_DHA", (H, slice(2, 3))), ("blocks/1/attn/wv_DUA", (H, slice(2, 3)))]),
}


def logits(cfg, params):
  return np.asarray(_apply(cfg, params, X)[0])


def grow(name, seed=0):
  make, op, _, _ = CASES[name]
  cfg = make()
  params = tf.init_params(cfg, seed)
  state, cfg2, reports = surgery.apply_ops({"params": params}, cfg, [op], KEY, shapes=tf.abstract_params)
  return cfg, params, cfg2, state["params"], reports


def with_m(params, m):
  return {**params, "ramp": {k: jnp.float32(m) for k in params["ramp"]}}


def plain(cfg2, params2):
  """The same weights as an ordinary model: no ramps in the config, no masks in the params."""
  return cfg2.replace(ramps=()), {k: v for k, v in params2.items() if k != "ramp"}


def by_hand(params2, masked, m):
  """numpy reference: the masked slices scaled by m (router bias: + log m) in the stored weights."""
  flat = {p: np.array(v) for p, v in trees.flatten(params2).items() if not p.startswith("ramp/")}
  for kind, path, idx in masked:
    if kind == "scale":
      flat[path][idx] *= np.float32(m)
    else:
      flat[path][idx] += np.float32(np.log(m))
  return trees.unflatten({p: jnp.asarray(v) for p, v in flat.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_m0_preserves_the_function_though_the_new_units_are_random(name):
  cfg, params, cfg2, params2, reports = grow(name)
  _, op, masked, fresh = CASES[name]
  assert len(cfg2.ramps) == 1 and cfg2.ramps[0][1] == op["ramp_steps"]
  assert float(params2["ramp"][cfg2.ramps[0][0]]) == 0.0
  assert all(r["exact"] for r in reports)
  flat = trees.flatten(params2)
  for kind, path, idx in masked:
    if kind == "scale":  # the new output slices are random and non-zero (no zero-init trick)
      s = np.asarray(flat[path])[idx]
      assert np.all(s != 0) and np.std(s) > 0.05, path
    else:  # the new experts' router bias starts at 0, not at -1e4
      np.testing.assert_array_equal(np.asarray(flat[path])[idx], 0.0)
  for path, idx in fresh:
    s = np.asarray(flat[path])[idx]
    assert np.all(s != 0) and np.std(s) > 1e-3, path
  before = logits(cfg, params)
  after = logits(cfg2, params2)
  np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
  # the same weights without the mask are a different function: the ramp is what makes it exact
  assert np.abs(logits(*plain(cfg2, params2)) - before).max() > 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_m1_is_the_plain_model_and_m_half_halves_the_new_slices(name):
  _, _, cfg2, params2, _ = grow(name)
  masked = CASES[name][2]
  want = logits(*plain(cfg2, params2))
  np.testing.assert_allclose(logits(cfg2, with_m(params2, 1.0)), want, atol=1e-5, rtol=0)
  half = logits(tf.base_config(cfg2), by_hand(params2, masked, 0.5))
  got = logits(cfg2, with_m(params2, 0.5))
  np.testing.assert_allclose(got, half, atol=1e-5, rtol=0)
  assert np.abs(got - want).max() > 1e-3  # m = 0.5 is neither end
  # folded for good (the automatic step before another op): the same function, weights bit-exact at m = 1
  for m in (0.5, 1.0):
    st, cfg3, (rep,) = surgery.apply_ops({"params": with_m(params2, m)}, cfg2, [dict(op="fold_ramps")], KEY,
                                         shapes=tf.abstract_params)
    assert cfg3.ramps == () and "ramp" not in st["params"] and rep["exact"]
    np.testing.assert_allclose(logits(cfg3, st["params"]), half if m == 0.5 else want, atol=1e-5, rtol=0)
  _, stripped = plain(cfg2, params2)
  for p, v in trees.flatten(st["params"]).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(trees.flatten(stripped)[p]), err_msg=p)


def test_growing_a_ramped_model_folds_first_and_a_ramped_op_must_be_last():
  cfg, params, cfg2, params2, _ = grow("add_experts")
  p = with_m(params2, 0.25)
  want = logits(cfg2, p)
  st, cfg3, reps = surgery.apply_ops({"params": p}, cfg2, [dict(op="add_heads", num_heads=3)], KEY,
                                     shapes=tf.abstract_params)
  assert [r["op"] for r in reps] == ["fold_ramps", "add_heads"] and cfg3.ramps == ()
  np.testing.assert_allclose(logits(cfg3, st["params"]), want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match=r"growth op #1 \(add_heads\) follows op #0 \(add_experts\), which adds a ramp"):
    surgery.grown_config(cfg, [dict(op="add_experts", num_experts=8, ramp_steps=2), dict(op="add_heads", num_heads=3)])
  with pytest.raises(ValueError, match="carries ramps"):
    add_heads(cfg2, num_heads=3)
  with pytest.raises(ValueError, match="split"):
    surgery.grown_config(cfg, [dict(op="add_experts", num_experts=8, ramp_steps=2, mode="split")])


def test_ramps_survive_json_and_are_validated():
  cfg2 = grow("widen_mlp")[2]
  back = ModelConfig.from_json(cfg2.to_json())
  assert back == cfg2 and hash(back) == hash(cfg2)
  assert json.loads(cfg2.to_json())["ramps"] == [["widen_mlp0", 4, [["scale", "blocks/0/mlp/wo_FD", 0, 32, 48],
                                                                    ["scale", "blocks/1/mlp/wo_EFD", 1, 24, 40],
                                                                    ["scale", "blocks/1/mlp/shared/wo_FD", 0, 8, 12]]]]
  with pytest.raises(ValueError, match=r"ramps\[0\] \(r\) target 0"):
    model(ramps=[["r", 2, [["double", "blocks/0/mlp/wo_FD", 0, 0, 4]]]])
  with pytest.raises(ValueError, match="does not fit"):
    tf.abstract_params(model(ramps=[["r", 2, [["scale", "blocks/0/mlp/wo_FD", 0, 30, 40]]]]))


def test_advance_reaches_exactly_one_after_n_steps():
  for n in (3, 4, 7, 10):
    cfg = model(ramps=[["r", n, [["scale", "blocks/0/mlp/wo_FD", 0, 0, 4]]]])
    p = tf.init_params(cfg, 0)
    seen = []
    for _ in range(n + 2):
      p = ramp.advance(p, cfg)
      seen.append(float(p["ramp"]["r"]))
    np.testing.assert_allclose(seen[:n - 1], [(k + 1) / n for k in range(n - 1)], rtol=1e-6)
    assert seen[n - 1:] == [1.0, 1.0, 1.0], (n, seen)
    assert p["ramp"]["r"].dtype == jnp.float32


# ---------------------------------------------------------------- through the trainer

STEPS0, STEPS1, N = 2, 5, 4


@pytest.fixture(scope="module")
def ramp_run(tmp_path_factory, data_dir):
  from moegrow.orchestrate import stages
  from _tiny import train_config
  c = train_config(data_dir, steps=0, eval_every=100, eval_batches=1, checkpoint_every=1, keep_checkpoints=20,
                   log_every=1)
  c.model.update(d_model=32, d_ff=64, moe_layers="every_other", num_experts=2, top_k=2)
  c.data.seq_len = 32
  c.stages = (dict(name="base", steps=STEPS0),
              dict(name="ramped", steps=STEPS1, ops=(dict(op="add_experts", num_experts=4, ramp_steps=N),)))
  wd = str(tmp_path_factory.mktemp("ramp") / "run")
  return c, wd, stages.train_and_evaluate(c, wd)


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


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_the_trainer_ramps_m_and_the_boundary_is_exact(ramp_run):
  from moegrow.train import optim
  c, wd, result = ramp_run
  (cert,) = result["certificates"]
  assert all(abs(v) < 1e-5 for v in cert["loss_change"].values()), cert["loss_change"]
  assert [r["op"] for r in cert["reports"]] == ["add_experts"] and cert["reports"][0]["exact"]
  ms = {}
  for k in range(STEPS1 + 1):
    state, cfg = _restore(wd, c, 1, STEPS0 + k)
    ms[k] = float(state["params"]["ramp"]["add_experts0"])
    if k == 0:
      first = state
  assert cfg.ramps[0][:2] == ("add_experts0", N)
  assert ms == {k: min(1.0, k / N) for k in ms}, ms
  # no optimizer state for the mask; the new experts (switched on by the ramp) trained
  mu = optim.adam_moments(state["opt_state"])["mu"]
  assert isinstance(mu["ramp"]["add_experts0"], optax.MaskedNode)
  new0 = np.asarray(first["params"]["blocks"]["1"]["mlp"]["wo_EFD"])[2:]
  new1 = np.asarray(state["params"]["blocks"]["1"]["mlp"]["wo_EFD"])[2:]
  assert np.abs(new1 - new0).max() > 1e-4
  assert np.all(np.asarray(state["params"]["blocks"]["1"]["mlp"]["router_bias_E"])[2:] > -100)


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_a_run_stopped_mid_ramp_resumes_bit_identically(ramp_run, tmp_path):
  from moegrow.orchestrate import stages
  c, wd, _ = ramp_run
  c2 = copy.deepcopy(c)
  c2.train.stop_at_step = STEPS0 + 2  # m = 0.5 in the checkpoint it stops at
  wd2 = str(tmp_path / "stopped")
  stages.train_and_evaluate(c2, wd2)
  state, _ = _restore(wd2, c2, 1, STEPS0 + 2)
  assert float(state["params"]["ramp"]["add_experts0"]) == 0.5
  c2.train.stop_at_step = 0
  stages.train_and_evaluate(c2, wd2)
  one = {r["step"]: r["loss"] for r in read_metrics(wd) if "loss" in r}
  two = {r["step"]: r["loss"] for r in read_metrics(wd2) if "loss" in r}
  assert sorted(two) == sorted(one) == list(range(1, STEPS0 + STEPS1 + 1))
  assert all(two[s] == one[s] for s in one), (one, two)


@pytest.mark.parametrize("name,fresh", [
    ("insert_blocks_dense", dict(op="insert_blocks", positions=[0, 2], init="random")),
    ("widen_mlp_gelu", dict(op="widen_mlp", d_ff=40, method="fresh")),
])
def test_unmasked_random_units_are_the_ramped_ones_at_m_one_and_not_preserving(name, fresh):
  """The non-preserving ablations (insert_blocks init='random', widen_mlp method='fresh') give the
  very weights of the ramped op, unmasked: logits equal the ramped model at m = 1 and differ from
  the old model's; the plan does not claim exactness."""
  cfg, params, cfg2, params2, _ = grow(name)
  state, cfg3, reports = surgery.apply_ops({"params": params}, cfg, [fresh], KEY, shapes=tf.abstract_params)
  assert cfg3 == cfg2.replace(ramps=()) and not reports[0]["exact"]
  np.testing.assert_allclose(logits(cfg3, state["params"]), logits(cfg2, with_m(params2, 1.0)), atol=1e-6)
  assert np.abs(logits(cfg3, state["params"]) - logits(cfg, params)).max() > 1e-3
