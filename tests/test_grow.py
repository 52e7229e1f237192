"""Growth ops (moegrow.surgery) through the rules engine: exactness on real text,
optimizer-state rules, what non-exact ops change, errors, jit."""
import inspect
import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moegrow.config import ModelConfig
from moegrow.model import transformer as tf
from moegrow.params import trees
from moegrow.surgery import apply as surgery
from moegrow.surgery import rules as T

KEY = jax.random.PRNGKey(7)
_apply = jax.jit(tf.apply, static_argnums=0)


def apply_ops(state, cfg, ops, key=None, **kw):
  return surgery.apply_ops(state, cfg, ops, key, shapes=tf.abstract_params, **kw)


def run(op, state, cfg, key, **args):
  """One op -> (state, cfg, report)."""
  new, cfg2, (rep,) = apply_ops(state, cfg, [dict(op=op, **args)], key)
  return new, cfg2, rep


def _tokens():
  text = inspect.getsource(textwrap).encode("utf-8")  # real text: a stdlib module's source
  return jnp.asarray(np.frombuffer(text[1000:1064], np.uint8).astype(np.int32).reshape(2, 32))


TOKENS = _tokens()


def logits(cfg, params):
  return np.asarray(_apply(cfg, params, TOKENS)[0])


def dense4(**kw):
  return ModelConfig(**{**dict(d_model=16, num_layers=4, num_heads=2, d_ff=32), **kw})


def moe2(**kw):  # 2 layers, layer 1 MoE with 4 experts and a shared expert
  base = dict(d_model=16, num_layers=2, num_heads=2, d_ff=32, moe_layers="every_other", num_experts=4,
              top_k=2, expert_d_ff=24, num_shared_experts=1, shared_d_ff=8, router_init_std=0.5)
  return ModelConfig(**{**base, **kw})


def random_state(cfg, seed=0):
  """Params plus random mu / positive nu (so moment tests can fail)."""
  params = tf.init_params(cfg, seed)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  ks = jax.random.split(jax.random.PRNGKey(seed + 100), 2 * len(leaves))
  mu = [jax.random.normal(k, x.shape) for k, x in zip(ks[::2], leaves)]
  nu = [jnp.abs(jax.random.normal(k, x.shape)) for k, x in zip(ks[1::2], leaves)]
  return {"params": params, "mu": treedef.unflatten(mu), "nu": treedef.unflatten(nu)}


def at(tree, path):
  return np.asarray(trees.flatten(tree)[path])


def assert_matches_abstract(params, cfg):
  got = {p: (tuple(x.shape), jnp.dtype(x.dtype)) for p, x in trees.flatten(params).items()}
  want = {p: (tuple(x.shape), jnp.dtype(x.dtype)) for p, x in trees.flatten(tf.abstract_params(cfg)).items()}
  assert got == want


# ---------------------------------------------------------------- 1. exact ops

EXACT = {
    "upcycle_topk_softmax_per_layer": (dense4, [{"op": "upcycle", "layers": [1, 3], "num_experts": [4, 8]}]),
    "upcycle_softmax_topk_zero_router": (dense4, [{"op": "upcycle", "layers": [1, 3], "num_experts": [4, 8],
                                                   "gating": "softmax_topk", "router_std": 0.0}]),
    "granular_topk_softmax_random_router": (dense4, [{"op": "granular_upcycle", "granularity": 2,
                                                      "num_experts": 6, "top_k": 4, "router_std": 0.5}]),
    "granular_softmax_topk_zero_router": (dense4, [{"op": "granular_upcycle", "granularity": 4, "num_experts": 8,
                                                    "top_k": 4, "gating": "softmax_topk", "router_std": 0.0}]),
    "add_experts_exact_softmax_topk": (lambda: moe2(gating="softmax_topk"),
                                       [{"op": "add_experts", "num_experts": 7, "noise_std": 0.1}]),
    "add_experts_exact_most_loaded": (moe2, [{"op": "add_experts", "num_experts": 6, "source": "most_loaded",
                                              "loads": {"1": [0.1, 0.4, 0.2, 0.3]}}]),
    "insert_blocks": (moe2, [{"op": "insert_blocks", "positions": [0, 2], "num_experts": 4}]),
    "widen_mlp_all_kinds": (moe2, [{"op": "widen_mlp", "d_ff": 48, "expert_d_ff": 40, "shared_d_ff": 13}]),
    "widen_mlp_gelu_round_robin": (lambda: dense4(mlp_act="gelu", tie_embeddings=False),
                                   [{"op": "widen_mlp", "d_ff": 75, "method": "round_robin"}]),
    "add_heads": (moe2, [{"op": "add_heads", "num_heads": 3}]),
    "widen_model_tied_moe": (moe2, [{"op": "widen_model", "d_model": 24}]),
    "widen_model_untied_gelu": (lambda: dense4(mlp_act="gelu", tie_embeddings=False),
                                [{"op": "widen_model", "d_model": 20}]),
    "chain": (lambda: dense4(num_layers=2),
              [{"op": "upcycle", "num_experts": 2, "layers": [1]}, {"op": "add_experts", "num_experts": 4},
               {"op": "widen_model", "d_model": 24}, {"op": "add_heads", "num_heads": 4},
               {"op": "widen_mlp", "d_ff": 40, "expert_d_ff": 40}, {"op": "insert_blocks", "positions": [1]}]),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_ops_preserve_logits(name):
  make, ops = EXACT[name]
  cfg = make()
  state = random_state(cfg)
  before = logits(cfg, state["params"])
  new, cfg2, reports = apply_ops(state, cfg, ops, KEY)
  assert_matches_abstract(new["params"], cfg2)
  for kind in ("mu", "nu"):
    assert jax.tree.map(jnp.shape, new[kind]) == jax.tree.map(jnp.shape, new["params"])
  after = logits(cfg2, new["params"])
  np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
  assert all(r["exact"] for r in reports)
  assert [r["op"] for r in reports] == [o["op"] for o in ops]
  json.dumps(reports)  # JSON-serialisable
  assert cfg2 != cfg


def test_upcycle_config_and_report():
  cfg = dense4()
  _, cfg2, (rep,) = apply_ops({"params": tf.init_params(cfg)}, cfg,
                                   [{"op": "upcycle", "layers": [1, 3], "num_experts": [4, 8]}], KEY)
  assert [cfg2.experts_in_layer(i) for i in range(4)] == [0, 4, 0, 8]
  assert rep["map"]["blocks/1/mlp/wact_EDF"]["from"] == ["blocks/1/mlp/wact_DF"]
  assert rep["map"]["blocks/1/mlp/router_DE"]["from"] == []
  assert rep["map"]["blocks/0/attn/wq_DHA"] == {"action": "copy", "from": ["blocks/0/attn/wq_DHA"]}


def test_softmax_topk_scale_folds_per_layer_factor_into_wo():
  cfg = dense4()
  p = tf.init_params(cfg)
  new, cfg2, _ = run("upcycle", {"params": p}, cfg, KEY, layers=[1, 3], num_experts=[4, 8], gating="softmax_topk",
                              router_std=0.0)
  assert cfg2.expert_output_scale == 2.0  # E/k of the first layer
  np.testing.assert_array_equal(at(new["params"], "blocks/1/mlp/wo_EFD")[2], at(p, "blocks/1/mlp/wo_FD"))
  np.testing.assert_allclose(at(new["params"], "blocks/3/mlp/wo_EFD")[5], 2 * at(p, "blocks/3/mlp/wo_FD"))


def test_softmax_topk_with_random_router_is_not_exact():
  cfg = dense4()
  state = {"params": tf.init_params(cfg)}
  new, cfg2, (rep,) = apply_ops(state, cfg, [{"op": "upcycle", "num_experts": 4, "gating": "softmax_topk",
                                                   "router_std": 1.0}], KEY)
  assert not rep["exact"]
  assert np.max(np.abs(logits(cfg2, new["params"]) - logits(cfg, state["params"]))) > 1e-3


def test_granular_expert_slices():
  cfg = dense4()
  p = tf.init_params(cfg)
  new, cfg2, _ = run("granular_upcycle", {"params": p}, cfg, KEY, granularity=4, num_experts=8, top_k=4, layers=[0])
  assert cfg2.expert_d_ff == 8 and cfg2.expert_output_scale == 4.0
  wact, wo = at(new["params"], "blocks/0/mlp/wact_EDF"), at(new["params"], "blocks/0/mlp/wo_EFD")
  for e in range(8):
    s = slice(8 * (e % 4), 8 * (e % 4) + 8)
    np.testing.assert_array_equal(wact[e], at(p, "blocks/0/mlp/wact_DF")[:, s])
    np.testing.assert_array_equal(wo[e], at(p, "blocks/0/mlp/wo_FD")[s])
  r = at(new["params"], "blocks/0/mlp/router_DE")
  np.testing.assert_array_equal(r[:, 0::4], r[:, 3::4])  # virtual groups: equal columns
  assert not np.array_equal(r[:, 0], r[:, 4])


def test_add_experts_split_preserves_router_mass():
  cfg = moe2()
  p = tf.init_params(cfg)
  new, _, rep = run("add_experts", {"params": p}, cfg, KEY, num_experts=7, mode="split")
  src = np.asarray(rep["sources"]["1"])
  x = np.asarray(jax.random.normal(KEY, (50, 16)))
  old = jax.nn.softmax(x @ at(p, "blocks/1/mlp/router_DE") + at(p, "blocks/1/mlp/router_bias_E"))
  prob = np.asarray(jax.nn.softmax(x @ at(new["params"], "blocks/1/mlp/router_DE")
                                   + at(new["params"], "blocks/1/mlp/router_bias_E")))
  merged = prob[:, :4].copy()
  np.add.at(merged.T, src, prob[:, 4:].T)
  np.testing.assert_allclose(merged, old, atol=1e-6)
  np.testing.assert_allclose(prob[:, 4:], prob[:, src], atol=1e-6)  # copies share mass equally
  assert not rep["exact"]


# ---------------------------------------------------------------- 2. optimizer state

def test_upcycle_moments_carry_and_reset():
  cfg = dense4()
  state = random_state(cfg)
  for mode in ("carry", "reset"):
    new, _, _ = run("upcycle", state, cfg, KEY, layers=[1, 3], num_experts=[4, 8], opt_state=mode)
    for kind in ("mu", "nu"):
      for i, e in ((1, 4), (3, 8)):
        for nm in ("wact", "wlin", "wo"):
          got = at(new[kind], f"blocks/{i}/mlp/{nm}_E{'FD' if nm == 'wo' else 'DF'}")
          dense = at(state[kind], f"blocks/{i}/mlp/{nm}_{'FD' if nm == 'wo' else 'DF'}")
          assert got.shape[0] == e
          for x in got:
            np.testing.assert_array_equal(x, dense if mode == "carry" else 0 * dense)
        assert not at(new[kind], f"blocks/{i}/mlp/router_DE").any()
      np.testing.assert_array_equal(at(new[kind], "blocks/1/attn/wq_DHA"), at(state[kind], "blocks/1/attn/wq_DHA"))
      np.testing.assert_array_equal(at(new[kind], "blocks/0/mlp/wact_DF"), at(state[kind], "blocks/0/mlp/wact_DF"))


def test_widen_mlp_moments_net2wider():
  cfg = dense4()
  state = random_state(cfg)
  new, _, _ = run("widen_mlp", state, cfg, KEY, d_ff=48, method="round_robin")
  idx = np.r_[np.arange(32), np.arange(16)]
  n = np.r_[np.full(16, 2.0), np.ones(16), np.full(16, 2.0)]
  for kind, power in (("mu", 1), ("nu", 2)):
    old_wo = at(state[kind], "blocks/2/mlp/wo_FD")
    np.testing.assert_allclose(at(new[kind], "blocks/2/mlp/wo_FD"), old_wo[idx] / n[:, None] ** power, rtol=1e-6)
    np.testing.assert_array_equal(at(new[kind], "blocks/2/mlp/wact_DF"), at(state[kind], "blocks/2/mlp/wact_DF")[:, idx])
  np.testing.assert_allclose(at(new["params"], "blocks/2/mlp/wo_FD"), at(state["params"], "blocks/2/mlp/wo_FD")[idx]
                             / n[:, None], rtol=1e-6)
  reset, _, _ = run("widen_mlp", state, cfg, KEY, d_ff=48, opt_state="reset")
  assert not at(reset["mu"], "blocks/2/mlp/wo_FD").any() and not at(reset["nu"], "blocks/2/mlp/wlin_DF").any()
  np.testing.assert_array_equal(at(reset["mu"], "embed_VD"), at(state["mu"], "embed_VD"))


def test_new_slices_get_zero_moments():
  cfg = moe2()
  state = random_state(cfg)
  new, _, _ = run("add_heads", state, cfg, KEY, num_heads=3)
  mu = at(new["mu"], "blocks/0/attn/wq_DHA")
  np.testing.assert_array_equal(mu[:, :2], at(state["mu"], "blocks/0/attn/wq_DHA"))
  assert not mu[:, 2].any() and not at(new["nu"], "blocks/1/attn/wo_HAD")[2].any()
  new, _, _ = run("widen_model", state, cfg, KEY, d_model=24)
  c = math.sqrt(16 / 24)
  np.testing.assert_allclose(at(new["nu"], "blocks/0/attn_norm/scale_D")[:16],
                             c * c * at(state["nu"], "blocks/0/attn_norm/scale_D"), rtol=1e-6)
  assert not at(new["mu"], "embed_VD")[:, 16:].any()
  new, _, _ = run("add_experts", state, cfg, KEY, num_experts=6)  # exact: new bias entries are new
  assert not at(new["mu"], "blocks/1/mlp/router_bias_E")[4:].any()
  np.testing.assert_array_equal(at(new["mu"], "blocks/1/mlp/wact_EDF")[4:], at(state["mu"], "blocks/1/mlp/wact_EDF")[:2])


# ---------------------------------------------------------------- 3. non-exact ops

def test_drop_upcycle_reinitialises_fraction_per_expert():
  cfg = dense4()
  state = random_state(cfg)
  new, _, rep = run("drop_upcycle", state, cfg, KEY, ratio=0.5, num_experts=4, layers=[2])
  assert not rep["exact"]
  wact, wlin = at(state["params"], "blocks/2/mlp/wact_DF"), at(state["params"], "blocks/2/mlp/wlin_DF")
  wo = at(state["params"], "blocks/2/mlp/wo_FD")
  masks = []
  for e in range(4):
    cols = np.any(at(new["params"], "blocks/2/mlp/wact_EDF")[e] != wact, axis=0)
    assert cols.sum() == 16
    np.testing.assert_array_equal(cols, np.any(at(new["params"], "blocks/2/mlp/wlin_EDF")[e] != wlin, axis=0))
    np.testing.assert_array_equal(cols, np.any(at(new["params"], "blocks/2/mlp/wo_EFD")[e] != wo, axis=1))
    np.testing.assert_array_equal(at(new["params"], "blocks/2/mlp/wact_EDF")[e][:, ~cols], wact[:, ~cols])
    np.testing.assert_array_equal(at(new["params"], "blocks/2/mlp/wo_EFD")[e][~cols], wo[~cols])
    mu = at(new["mu"], "blocks/2/mlp/wact_EDF")[e]
    assert not mu[:, cols].any()
    np.testing.assert_array_equal(mu[:, ~cols], at(state["mu"], "blocks/2/mlp/wact_DF")[:, ~cols])
    masks.append(cols)
  assert len({m.tobytes() for m in masks}) > 1  # different experts, different subsets
  fresh = at(new["params"], "blocks/2/mlp/wact_EDF")[0][:, masks[0]]
  assert abs(fresh.std() - wact.std()) < 0.3 * wact.std()


def test_add_experts_copy_noise_keeps_old_experts():
  cfg = moe2()
  p = tf.init_params(cfg)
  new, cfg2, rep = run("add_experts", {"params": p}, cfg, KEY, num_experts=6, mode="copy_noise", source="most_loaded",
                                    loads={1: np.array([0.1, 0.4, 0.2, 0.3])})
  assert rep["sources"] == {"1": [1, 3]} and cfg2.experts_in_layer(1) == 6
  for nm in ("wact_EDF", "wlin_EDF", "wo_EFD"):
    old, grown = at(p, f"blocks/1/mlp/{nm}"), at(new["params"], f"blocks/1/mlp/{nm}")
    np.testing.assert_array_equal(grown[:4], old)
    assert not np.array_equal(grown[4], old[1])
    np.testing.assert_allclose(grown[4], old[1], atol=0.1 * np.abs(old[1]).max())
  np.testing.assert_array_equal(at(new["params"], "blocks/1/mlp/router_DE")[:, :4], at(p, "blocks/1/mlp/router_DE"))
  np.testing.assert_array_equal(at(new["params"], "blocks/1/mlp/router_bias_E")[:4], at(p, "blocks/1/mlp/router_bias_E"))


def test_add_experts_hidden_router_by_hand():
  cfg = moe2()
  state = random_state(cfg)
  rng = np.random.default_rng(3)
  c_old, c_new = rng.normal(size=16), rng.normal(size=16)
  new, cfg2, _ = run("add_experts", state, cfg, KEY, num_experts=6, mode="copy_noise", noise_std=0.0,
                     router_init="hidden", router_domain="python", centroids={"1": [c_old, c_new]})
  w, b = at(state["params"], "blocks/1/mlp/router_DE"), at(state["params"], "blocks/1/mlp/router_bias_E")
  w2, b2 = at(new["params"], "blocks/1/mlp/router_DE"), at(new["params"], "blocks/1/mlp/router_bias_E")
  np.testing.assert_array_equal(w2[:, :4], w)  # old columns untouched
  np.testing.assert_array_equal(b2[:4], b)
  col = (c_new - c_old) / np.linalg.norm(c_new - c_old) * np.mean(np.linalg.norm(w, axis=0))  # by hand
  for e in (4, 5):
    np.testing.assert_allclose(w2[:, e], col, rtol=1e-5, atol=1e-6)
    m = (c_old + c_new) / 2
    np.testing.assert_allclose(b2[e], np.mean(m @ w + b) - m @ col, rtol=1e-4, atol=1e-5)
  # a token at the new domain's centroid prefers the new experts more than one at the old centroid
  gap = lambda x: (x @ w2 + b2)[4] - np.max((x @ w2 + b2)[:4])
  assert gap(c_new) > gap(c_old)
  for kind in ("mu", "nu"):  # new router columns and biases have no history
    assert not at(new[kind], "blocks/1/mlp/router_DE")[:, 4:].any()
    assert not at(new[kind], "blocks/1/mlp/router_bias_E")[4:].any()
  with pytest.raises(ValueError, match="router_init='hidden' .* needs mode='copy_noise'"):
    run("add_experts", state, cfg, KEY, num_experts=6, router_init="hidden", centroids={"1": [c_old, c_new]})
  with pytest.raises(ValueError, match=r"needs centroids=.* for layers \[1\] \(router_domain='python'\)"):
    run("add_experts", state, cfg, KEY, num_experts=6, mode="copy_noise", router_init="hidden", router_domain="python")
  with pytest.raises(ValueError, match=r"centroids for layer 1 must be \[old, new\] of shape \(2, 16\)"):
    run("add_experts", state, cfg, KEY, num_experts=6, mode="copy_noise", router_init="hidden",
        centroids={1: np.zeros((3, 16))})


def test_stack_copies_layers_in_order():
  cfg = moe2(num_shared_experts=0)
  state = random_state(cfg)
  new, cfg2, rep = run("stack", state, cfg, KEY, times=2)
  assert cfg2.num_layers == 4 and cfg2.moe_layer_ids == (1, 3) and not rep["exact"]
  for j in range(4):
    for path, x in trees.flatten(new["params"]["blocks"][str(j)]).items():
      np.testing.assert_array_equal(x, at(state["params"], f"blocks/{j % 2}/{path}"))
  reset, _, _ = run("stack", state, cfg, KEY, times=2, opt_state="reset")
  np.testing.assert_array_equal(at(reset["mu"], "blocks/1/mlp/wact_EDF"), at(state["mu"], "blocks/1/mlp/wact_EDF"))
  assert not at(reset["mu"], "blocks/3/mlp/wact_EDF").any()


def test_insert_blocks_shifts_moe_mapping():
  cfg = moe2()
  state = random_state(cfg)
  new, cfg2, rep = run("insert_blocks", state, cfg, KEY, positions=[1])
  assert cfg2.num_layers == 3 and cfg2.moe_layer_ids == (2,) and cfg2.experts_in_layer(2) == 4
  np.testing.assert_array_equal(at(new["params"], "blocks/2/mlp/wact_EDF"), at(state["params"], "blocks/1/mlp/wact_EDF"))
  np.testing.assert_array_equal(at(new["mu"], "blocks/2/mlp/wact_EDF"), at(state["mu"], "blocks/1/mlp/wact_EDF"))
  assert not at(new["params"], "blocks/1/attn/wo_HAD").any() and not at(new["params"], "blocks/1/mlp/wo_FD").any()
  assert not at(new["mu"], "blocks/1/attn/wq_DHA").any()
  assert rep["map"]["blocks/2/attn/wq_DHA"]["from"] == ["blocks/1/attn/wq_DHA"]


# ---------------------------------------------------------------- 4. errors

@pytest.mark.parametrize("cfg_fn, ops, match", [
    (moe2, [{"op": "add_experts", "num_experts": 2}], r"layer 1 has 4 experts; cannot shrink to 2"),
    (dense4, [{"op": "upcycle", "layers": [7]}], r"layer\(s\) \[7\] do not exist .*4 layers"),
    (moe2, [{"op": "upcycle", "layers": [1], "num_experts": 4}], r"\[1\] are already MoE"),
    (moe2, [{"op": "add_experts", "layers": [0], "num_experts": 8}], r"\[0\] are dense"),
    (dense4, [{"op": "grow_taller"}], r"unknown growth op 'grow_taller'"),
    (dense4, [{"op": "upcycle", "num_expert": 8}], r"unknown argument\(s\) \['num_expert'\]"),
    (dense4, [{"op": "upcycle", "num_experts": "8"}], r"argument num_experts='8' must be"),
    (dense4, [{"op": "upcycle", "opt_state": "keep"}], r"argument opt_state='keep'"),
    (dense4, [{"op": "granular_upcycle", "granularity": 2, "num_experts": 4, "top_k": 1}], r"multiple of granularity"),
    (dense4, [{"op": "upcycle", "num_experts": 8, "top_k": 0}], r"top_k=0 must be an integer >= 1"),
    (moe2, [{"op": "add_experts", "num_experts": 6, "source": "most_loaded"}], r"needs loads"),
    (dense4, [{"op": "widen_mlp", "d_ff": 16}], r"cannot shrink d_ff 32 -> 16"),
    (dense4, [{"op": "insert_blocks", "positions": [9]}], r"positions"),
])
def test_errors(cfg_fn, ops, match):
  cfg = cfg_fn()
  with pytest.raises(ValueError, match=match):
    apply_ops({"params": tf.init_params(cfg)}, cfg, ops, KEY)


def test_rules_engine_lists_offending_paths():
  cfg = dense4(num_layers=1)
  cfg2 = cfg.replace(moe_layers="all", num_experts=2)
  src, target = tf.abstract_params(cfg), tf.abstract_params(cfg2)
  with pytest.raises(ValueError) as err:  # router never produced, dense wo never used
    jax.eval_shape(lambda s: T.apply_rules(s, target, [
        (r"blocks/0/mlp/(wact|wlin|wo)_E(DF|FD)", T.stack(r"blocks/0/mlp/\1_DF", 2)),
        ("blocks/0/mlp/router_bias_E", T.init("zeros")), (".*", T.copy())])[0], src)
  msg = str(err.value)
  assert "blocks/0/mlp/router_DE" in msg and "blocks/0/mlp/wo_FD" in msg
  assert "blocks/0/mlp/wo_DF" in msg  # the stack rule reads a source that does not exist
  assert "blocks/0/mlp/wact_DF" not in msg.split("neither used")[-1]
  good = [(r"blocks/0/mlp/(wact|wlin)_EDF", T.stack(r"blocks/0/mlp/\1_DF", 2)),
          ("blocks/0/mlp/wo_EFD", T.stack("blocks/0/mlp/wo_FD", 2)),
          ("blocks/0/mlp/router_DE", T.init("normal", std=0.1)), ("blocks/0/mlp/router_bias_E", T.init("zeros")),
          (".*", T.copy())]
  out = jax.eval_shape(lambda s: T.apply_rules(s, target, good)[0], src)
  assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, target)
  with pytest.raises(ValueError, match=r"blocks/0/mlp/wo_EFD \(stack.*got \(3, 32, 16\)"):  # wrong shape
    jax.eval_shape(lambda s: T.apply_rules(s, target, [("blocks/0/mlp/wo_EFD", T.stack("blocks/0/mlp/wo_FD", 3))]
                                           + good)[0], src)


def test_rules_engine_drop_and_flatten():
  src = {"a": {"b": jnp.ones((2,)), "old": jnp.zeros((3,))}, "c": jnp.ones((1, 2))}
  target = {"a": {"b": jax.ShapeDtypeStruct((4,), jnp.float32)}, "c": jax.ShapeDtypeStruct((1, 2), jnp.float32)}
  with pytest.raises(ValueError, match=r"neither used nor dropped: \['a/old'\]"):
    T.apply_rules(src, target, [("a/b", T.tile("a/b", 2)), (".*", T.copy())])
  out, plan = T.apply_rules(src, target, [("a/b", T.tile("a/b", 2)), ("a/old", T.drop()), (".*", T.copy())])
  assert out["a"]["b"].shape == (4,) and plan["c"][1] == ["c"]
  assert trees.unflatten(trees.flatten(src)).keys() == src.keys()
  assert sorted(["blocks/10", "blocks/2"], key=trees.natural_key) == ["blocks/2", "blocks/10"]


# ---------------------------------------------------------------- 5. jit

@pytest.mark.parametrize("ops", [
    [{"op": "upcycle", "layers": [1, 3], "num_experts": [4, 8]}],
    [{"op": "widen_mlp", "d_ff": 48}],
    [{"op": "drop_upcycle", "num_experts": 4, "layers": [0]}, {"op": "add_experts", "num_experts": 6,
                                                               "mode": "copy_noise"}],
])
def test_jit_matches_eager(ops):
  cfg = dense4()
  state = random_state(cfg)
  eager, cfg_e, rep_e = apply_ops(state, cfg, ops, KEY)
  jitted, cfg_j, rep_j = apply_ops(state, cfg, ops, KEY, jit=True)
  assert cfg_e == cfg_j and rep_e == rep_j
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
