"""Shrinking the expert table (moegrow/surgery/shrink_ops.py): the saliencies against a hand
computation (a plain loop over tokens and experts in numpy), pruning keeps exactly the chosen
experts' slices of params and moments, the refusals name what is wrong, and a pruned model trains
on and grows again at stage boundaries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow.model import transformer as tf
from moegrow.orchestrate import parts, stages
from moegrow.params import trees
from moegrow.sharding import make_mesh
from moegrow.surgery import apply as surgery
from moegrow.train import probes
from _tiny import moe, train_config

RNG = np.random.default_rng(0)


def apply_ops(state, cfg, ops):
  return surgery.apply_ops(state, cfg, ops, jax.random.key(0), shapes=tf.abstract_params)


def naive_saliencies(cfg, params, tokens):
  """(frequency, reap) of MoE layer 1 by a loop over tokens: the layer's MLP input from the model,
  then the router, the top-k, the gates and every expert's output in numpy."""
  inputs = tf.apply(cfg, params, jnp.asarray(tokens), mlp_inputs=True)[1]["mlp_inputs"]
  h = np.asarray(inputs[1] if 1 in inputs else inputs["1"], np.float64)
  m = {k: np.asarray(v, np.float64) for k, v in trees.flatten(params).items() if k.startswith("blocks/1/mlp/")}
  p = "blocks/1/mlp/"
  e, k = cfg.experts_in_layer(1), cfg.top_k
  silu = lambda z: z / (1 + np.exp(-z))
  count, gate_norm = np.zeros(e), np.zeros(e)
  for x in h.reshape(-1, h.shape[-1]):
    logits = x @ m[p + "router_DE"] + m[p + "router_bias_E"]
    if cfg.gating == "topk_softmax":
      chosen = np.argsort(-logits, kind="stable")[:k]
      g = np.exp(logits[chosen] - logits[chosen].max())
      gates = g / g.sum()
    else:
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      chosen = np.argsort(-probs, kind="stable")[:k]
      gates = probs[chosen]
    for j, gate in zip(chosen, gates):
      y = (silu(x @ m[p + "wact_EDF"][j]) * (x @ m[p + "wlin_EDF"][j])) @ m[p + "wo_EFD"][j]
      count[j] += 1
      gate_norm[j] += gate * np.linalg.norm(y)
  return count / count.sum(), np.where(count > 0, gate_norm / np.maximum(count, 1), 0.0)


@pytest.mark.parametrize("gating", ["topk_softmax", "softmax_topk"])
def test_frequency_and_reap_are_the_hand_computation(gating):
  cfg = moe(gating=gating, router_init_std=1.0)
  params = tf.init_params(cfg, jax.random.key(3))
  tokens = RNG.integers(0, 259, (3, 16)).astype(np.int32)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  freq, reap = naive_saliencies(cfg, params, tokens)
  got_freq = probes.expert_loads(cfg, params, [{"inputs": tokens}], mesh)
  got_reap = probes.reap_scores(cfg, params, [{"inputs": tokens}], mesh)
  np.testing.assert_allclose(got_freq[1] if 1 in got_freq else got_freq["1"], freq, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_reap["1"], reap, rtol=2e-4, atol=1e-6)
  assert len(set(np.round(reap, 6))) == len(reap)  # the experts are told apart


def test_merge_features_are_the_hand_computation():
  """expert_features: each expert's mean output over the tokens (a loop over experts in numpy), and
  router vectors with the cosine distances of the experts' logit vectors over those tokens."""
  cfg = moe(router_init_std=1.0)
  params = tf.init_params(cfg, jax.random.key(4))
  tokens = RNG.integers(0, 259, (3, 16)).astype(np.int32)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  got = probes.expert_features(cfg, params, [{"inputs": tokens}], mesh)["1"]
  inputs = tf.apply(cfg, params, jnp.asarray(tokens), mlp_inputs=True)[1]["mlp_inputs"]
  h = np.asarray(inputs["1"], np.float64).reshape(-1, cfg.d_model)
  m = {k: np.asarray(v, np.float64) for k, v in trees.flatten(params).items() if k.startswith("blocks/1/mlp/")}
  p = "blocks/1/mlp/"
  silu = lambda z: z / (1 + np.exp(-z))
  out = [np.mean((silu(h @ m[p + "wact_EDF"][e]) * (h @ m[p + "wlin_EDF"][e])) @ m[p + "wo_EFD"][e], axis=0)
         for e in range(4)]
  np.testing.assert_allclose(got["output"], out, rtol=1e-4, atol=1e-6)
  logits_EN = (h @ m[p + "router_DE"] + m[p + "router_bias_E"]).T
  cosine = lambda x: (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
  assert np.shape(got["router"]) == (4, 4)  # E x E whatever the number of tokens
  np.testing.assert_allclose(cosine(np.asarray(got["router"])), cosine(logits_EN), atol=1e-5)


def state_of(cfg):
  params = tf.init_params(cfg, jax.random.key(1))
  noise = lambda s: jax.tree_util.tree_map(lambda x: jnp.asarray(RNG.normal(size=x.shape), x.dtype), params)
  return {"params": params, "mu": noise(1), "nu": jax.tree_util.tree_map(jnp.abs, noise(2))}


@pytest.mark.parametrize("saliency, arg, kept", [
    ("list", {"keep": {1: [3, 1]}}, [1, 3]),
    ("frequency", {"scores": {"1": [0.1, 0.4, 0.1, 0.4]}}, [1, 3]),  # ties: the lower index
    ("reap", {"scores": {1: [2.0, 0.5, 3.0, 1.0]}}, [0, 2])])
def test_pruning_keeps_exactly_the_chosen_experts_params_and_moments(saliency, arg, kept):
  cfg = moe()
  state = state_of(cfg)
  new, cfg2, (rep,) = apply_ops(state, cfg, [dict(op="prune_experts", num_experts=2, saliency=saliency, **arg)])
  assert cfg2.experts_in_layer(1) == 2 and cfg2.top_k == cfg.top_k and rep["kept"] == {"1": kept}
  for kind in ("params", "mu", "nu"):
    old, got = trees.flatten(state[kind]), trees.flatten(new[kind])
    assert set(got) == set(old), kind
    for path, v in got.items():
      o = np.asarray(old[path])
      if path.startswith("blocks/1/mlp/") and path.rsplit("/", 1)[1] in ("wact_EDF", "wlin_EDF", "wo_EFD",
                                                                          "router_bias_E"):
        o = o[kept]
      elif path == "blocks/1/mlp/router_DE":
        o = o[:, kept]
      np.testing.assert_array_equal(np.asarray(v), o, err_msg=f"{kind} {path}")


def test_random_pruning_is_seeded():
  cfg = moe(num_experts=8)
  plan = lambda seed: surgery.OPS["prune_experts"](cfg, num_experts=3, saliency="random", seed=seed)
  assert plan(0).extra == plan(0).extra
  assert len({str(plan(s).extra["kept"]["1"]) for s in range(6)}) > 1
  assert all(len(set(plan(s).extra["kept"]["1"])) == 3 for s in range(6))


@pytest.mark.parametrize("op, match", [
    (dict(num_experts=5, saliency="list", keep={1: [0, 1, 2, 3, 4]}), r"layer 1 has 4 experts; cannot keep 5"),
    (dict(num_experts=1, saliency="list", keep={1: [2]}), r"layer\(s\) \[1\] would keep \[1\] expert\(s\), fewer "
                                                         r"than top_k=2; give top_k=<at most 1>"),
    (dict(num_experts=2, saliency="list", keep={1: [2, 2]}), r"keep\[1\]=\[2, 2\] must be 2 distinct experts"),
    (dict(num_experts=2, saliency="reap"), r"saliency='reap' needs scores=\{layer: vector of experts\} for "
                                           r"layers \[1\]"),
    (dict(num_experts=2, scores={1: [1.0, 2.0]}), r"scores for layer 1 must be 4 finite numbers"),
    (dict(num_experts=2, layers=[0]), r"layer\(s\) \[0\] are dense")])
def test_pruning_refusals_name_the_problem(op, match):
  cfg = moe()
  with pytest.raises(ValueError, match=match):
    apply_ops({"params": tf.init_params(cfg, jax.random.key(0))}, cfg, [dict(op="prune_experts", **op)])


def test_pruning_to_one_expert_with_top_k_one():
  cfg = moe()
  new, cfg2, _ = apply_ops({"params": tf.init_params(cfg, jax.random.key(0))}, cfg,
                           [dict(op="prune_experts", num_experts=1, top_k=1, saliency="list", keep={1: [2]})])
  assert cfg2.top_k == 1 and cfg2.experts_in_layer(1) == 1
  logits, _ = tf.apply(cfg2, new["params"], jnp.zeros((1, 4), jnp.int32))
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
@pytest.mark.parametrize("saliency", ["frequency", "reap"])
def test_a_pruned_model_trains_on_and_grows_again(tmp_path, data_dir, saliency):
  """E=4 trained, pruned to 2 at a boundary by a saliency measured there, trained, grown back to 4
  experts: every stage trains; the certificate reports the cut's measured loss change."""
  c = train_config(data_dir, steps=0, eval_every=0, checkpoint_every=2)
  c.model.update(moe_layers="every_other", num_experts=4, top_k=1)
  c.stages = (dict(name="e4", steps=2),
              dict(name="pruned", steps=2, ops=(dict(op="prune_experts", num_experts=2, saliency=saliency),)),
              dict(name="regrown", steps=2, ops=(dict(op="add_experts", num_experts=4),)))
  r = stages.train_and_evaluate(c, str(tmp_path / "run"))
  assert r["stage"] == 2 and r["step"] == 6 and np.isfinite(r["loss"])
  prune, grow = r["certificates"]
  (op,) = prune["ops"]
  assert op["op"] == "prune_experts" and len(op["scores"]["1"]) == 4  # measured at the boundary
  assert all(np.isfinite(v) and v != 0.0 for v in prune["loss_change"].values())  # not exact: reported as is
  assert all(abs(v) < 1e-5 for v in grow["loss_change"].values())  # add_experts(exact) after the prune


@pytest.mark.parametrize("gating, same", [("topk_softmax", True), ("softmax_topk", False)])
def test_pruning_experts_no_token_selects_is_exact_only_with_renormalised_gates(gating, same):
  """Experts 2 and 3 made unreachable (router bias -8 against 0: never in the top 2 of 4 on these
  tokens, yet holding softmax mass): dropping them leaves renormalised top-k gates unchanged and
  changes softmax-then-top-k gates (their denominator loses that mass)."""
  cfg = moe(gating=gating)
  params = tf.init_params(cfg, jax.random.key(5))
  flat = trees.flatten(params)
  flat["blocks/1/mlp/router_bias_E"] = jnp.asarray([0.0, 0.0, -8.0, -8.0], jnp.float32)
  flat["blocks/1/mlp/router_DE"] = flat["blocks/1/mlp/router_DE"] * 0.01
  params = trees.unflatten(flat)
  tokens = jnp.asarray(RNG.integers(0, 259, (2, 12)), jnp.int32)
  mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
  loads = probes.expert_loads(cfg, params, [{"inputs": np.asarray(tokens)}], mesh)
  assert (loads[1] if 1 in loads else loads["1"])[2:] == [0.0, 0.0]
  new, cfg2, _ = apply_ops({"params": params}, cfg, [dict(op="prune_experts", num_experts=2, saliency="list",
                                                          keep={1: [0, 1]})])
  before, after = (np.asarray(tf.apply(c, p, tokens)[0]) for c, p in ((cfg, params), (cfg2, new["params"])))
  assert np.allclose(before, after, rtol=1e-5, atol=1e-5) == same


def test_a_prune_the_expert_axis_no_longer_divides_is_refused_before_training(data_dir):
  from moegrow.orchestrate.validate import ConfigError, validate_config
  c = train_config(data_dir, steps=0)
  c.mesh.update(data=2, expert=4, num_devices=8)
  c.model.update(moe_layers="every_other", num_experts=8, top_k=1)
  c.stages = (dict(name="e8", steps=2),
              dict(name="pruned", steps=2, ops=(dict(op="prune_experts", num_experts=2, saliency="random"),)))
  with pytest.raises(ConfigError, match=r"stages\[1\]='stage pruned: layer 1 has 2 experts'.*mesh.expert=4 divides"):
    validate_config(c, 8)
  c.stages = (c.stages[0], dict(c.stages[1], ops=(dict(op="prune_experts", num_experts=4, saliency="random"),)))
  assert [x.experts_in_layer(1) for x in validate_config(c, 8)] == [8, 4]


# ---------------------------------------------------------------- merging experts

def test_clustering_groups_the_nearest_experts_by_average_linkage():
  from moegrow.surgery.shrink_ops import cluster
  f = np.asarray([[1.0, 0.0], [0.0, 1.0], [0.95, 0.05], [0.1, 0.9], [-1.0, 0.1]])
  assert cluster(f, 3) == [[0, 2], [1, 3], [4]]
  # the last merge by hand: the pair of groups with the smallest mean pairwise cosine distance
  cos = lambda a, b: 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  link = lambda g, h: np.mean([cos(f[a], f[b]) for a in g for b in h])
  three = [[0, 2], [1, 3], [4]]
  pairs = {(a, b): link(three[a], three[b]) for a in range(3) for b in range(a + 1, 3)}
  a, b = min(pairs, key=pairs.get)
  want = sorted([sorted(three[a] + three[b])] + [g for n, g in enumerate(three) if n not in (a, b)], key=min)
  assert cluster(f, 2) == want == [[0, 1, 2, 3], [4]]


def test_merging_two_experts_is_their_usage_weighted_mean_in_params_and_moments():
  cfg = moe()
  state = state_of(cfg)
  usage = [0.1, 0.5, 0.3, 0.1]
  new, cfg2, (rep,) = apply_ops(state, cfg, [dict(op="merge_experts", num_experts=3, grouping="list",
                                                  groups={1: [[2, 0], [1], [3]]}, usage={1: usage})])
  assert cfg2.experts_in_layer(1) == 3 and rep["groups"] == {"1": [[0, 2], [1], [3]]}
  w0, w2 = 0.1 / 0.4, 0.3 / 0.4  # usage within the group {0, 2}
  p = "blocks/1/mlp/"
  for kind in ("params", "mu", "nu"):
    old, got = trees.flatten(state[kind]), trees.flatten(new[kind])
    for leaf, axis in (("wact_EDF", 0), ("wlin_EDF", 0), ("wo_EFD", 0), ("router_bias_E", 0), ("router_DE", 1)):
      o = np.moveaxis(np.asarray(old[p + leaf], np.float64), axis, 0)
      want = np.stack([w0 * o[0] + w2 * o[2], o[1], o[3]])
      np.testing.assert_allclose(np.moveaxis(np.asarray(got[p + leaf]), axis, 0), want, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{kind} {leaf}")
    np.testing.assert_array_equal(np.asarray(got["embed_VD"]), np.asarray(old["embed_VD"]))


@pytest.mark.parametrize("gating, same", [("topk_softmax", True), ("softmax_topk", False)])
def test_merging_identical_experts_is_exact_with_renormalised_gates(gating, same):
  """An upcycled layer (4 copies of one MLP, different router columns) merged into 2: with
  renormalised top-k gates every token still gets that MLP's output; softmax-then-top-k gates
  change their sum (2 of 4 experts held half the mass, 2 of 2 hold all of it)."""
  from _tiny import model
  cfg = model(gating=gating, top_k=2, router_init_std=0.5)
  params = tf.init_params(cfg, jax.random.key(2))
  up, cfg_up, _ = apply_ops({"params": params}, cfg, [dict(op="upcycle", layers=[1], num_experts=4)])
  merged, cfg2, _ = apply_ops(up, cfg_up, [dict(op="merge_experts", num_experts=2, grouping="list",
                                                groups={1: [[0, 3], [1, 2]]}, usage={1: [0.4, 0.1, 0.2, 0.3]})])
  tokens = jnp.asarray(RNG.integers(0, 259, (2, 12)), jnp.int32)
  before = np.asarray(tf.apply(cfg_up, up["params"], tokens)[0])
  after = np.asarray(tf.apply(cfg2, merged["params"], tokens)[0])
  assert np.allclose(before, after, rtol=1e-5, atol=1e-5) == same


def test_merge_experts_refusals_name_the_problem():
  cfg = moe()
  init = {"params": tf.init_params(cfg, jax.random.key(0))}
  with pytest.raises(ValueError, match=r"groups\[1\]=\[\[0, 1\], \[1, 2\]\] must split experts 0..3 into 2"):
    apply_ops(init, cfg, [dict(op="merge_experts", num_experts=2, grouping="list", groups={1: [[0, 1], [1, 2]]})])
  with pytest.raises(ValueError, match=r"grouping='output' needs features=\{layer: \[E, n\] vectors\} for layers \[1\]"):
    apply_ops(init, cfg, [dict(op="merge_experts", num_experts=2)])
  with pytest.raises(ValueError, match=r"features for layer 1 must be 4 finite vectors"):
    apply_ops(init, cfg, [dict(op="merge_experts", num_experts=2, features={1: [[1.0, 2.0]]})])


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_a_merged_model_trains_on_after_a_boundary_that_measures_its_groups(tmp_path, data_dir):
  c = train_config(data_dir, steps=0, eval_every=0, checkpoint_every=2)
  c.model.update(moe_layers="every_other", num_experts=4, top_k=1)
  c.stages = (dict(name="e4", steps=2),
              dict(name="merged", steps=2, ops=(dict(op="merge_experts", num_experts=2, grouping="output",
                                                     align=True),)))
  r = stages.train_and_evaluate(c, str(tmp_path / "run"))
  assert r["stage"] == 1 and r["step"] == 4 and np.isfinite(r["loss"])
  (cert,) = r["certificates"]
  (op,) = cert["ops"]
  assert np.shape(op["features"]["1"]) == (4, 64) and len(op["usage"]["1"]) == 4
  perms = np.asarray(op["perms"]["1"])  # measured on the source: onto the most used expert
  f = parts.model_config(c).expert_d_ff
  assert perms.shape == (4, f) and all(sorted(row) == list(range(f)) for row in perms.tolist())
  np.testing.assert_array_equal(perms[int(np.argmax(op["usage"]["1"]))], np.arange(f))
  assert all(np.isfinite(v) for v in cert["loss_change"].values())


def test_weight_matching_recovers_a_known_permutation():
  """Expert 1 is expert 0 with its hidden units shuffled by a known permutation: matching against
  expert 0 finds it (aligning expert 1 gives expert 0's weights exactly); expert 0's row is the
  identity."""
  from moegrow.surgery.shrink_ops import hidden_unit_perms
  d, f = 8, 12
  wact, wlin, wo = (RNG.normal(size=s) for s in ((3, d, f), (3, d, f), (3, f, d)))
  pi = RNG.permutation(f)
  wact[1], wlin[1], wo[1] = wact[0][:, pi], wlin[0][:, pi], wo[0][pi]
  perms = hidden_unit_perms(wact, wlin, wo, reference=0)
  np.testing.assert_array_equal(perms[0], np.arange(f))
  np.testing.assert_array_equal(wact[1][:, perms[1]], wact[0])
  np.testing.assert_array_equal(wo[1][perms[1]], wo[0])
  np.testing.assert_array_equal(pi[perms[1]], np.arange(f))  # the inverse of the shuffle


def test_merging_a_shuffled_copy_is_exact_only_when_aligned():
  """Experts 0 and 1 compute the same function (1 is 0 with its hidden units shuffled, moments
  shuffled alike): merged with alignment the group is expert 0, weights and moments; without it
  the mean mixes unrelated units."""
  from moegrow.surgery.shrink_ops import hidden_unit_perms
  cfg = moe(num_shared_experts=0)
  params = tf.init_params(cfg, 0)
  m = params["blocks"]["1"]["mlp"]
  pi = jnp.asarray(RNG.permutation(cfg.expert_d_ff))
  for k in ("wact_EDF", "wlin_EDF"):
    m[k] = m[k].at[1].set(m[k][0][:, pi])
  m["wo_EFD"] = m["wo_EFD"].at[1].set(m["wo_EFD"][0][pi])
  m["router_DE"] = m["router_DE"].at[:, 1].set(m["router_DE"][:, 0])
  mu = jax.tree.map(lambda x: jnp.asarray(RNG.normal(size=x.shape), x.dtype), params)
  mu["blocks"]["1"]["mlp"]["wo_EFD"] = mu["blocks"]["1"]["mlp"]["wo_EFD"].at[1].set(
      mu["blocks"]["1"]["mlp"]["wo_EFD"][0][pi])
  perms = {1: hidden_unit_perms(m["wact_EDF"], m["wlin_EDF"], m["wo_EFD"], reference=0)}
  op = dict(op="merge_experts", num_experts=3, grouping="list", groups={1: [[0, 1], [2], [3]]})
  state = {"params": params, "mu": mu, "nu": jax.tree.map(jnp.square, mu)}
  aligned, _, _ = apply_ops(state, cfg, [dict(op, align=True, perms=perms)])
  plain, _, _ = apply_ops(state, cfg, [op])
  got = aligned["params"]["blocks"]["1"]["mlp"]
  for k in ("wact_EDF", "wlin_EDF", "wo_EFD"):
    np.testing.assert_allclose(got[k][0], m[k][0], atol=1e-6)
    assert np.abs(plain["params"]["blocks"]["1"]["mlp"][k][0] - m[k][0]).max() > 1e-2
  np.testing.assert_allclose(aligned["mu"]["blocks"]["1"]["mlp"]["wo_EFD"][0], mu["blocks"]["1"]["mlp"]["wo_EFD"][0],
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"align=True needs perms"):
    apply_ops(state, cfg, [dict(op, align=True)])
