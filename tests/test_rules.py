"""The surgery rules engine (moegrow.surgery.rules), action by action against hand-computed arrays,
and the plain-tree helpers of moegrow.params.trees. (Whole growth ops are tested in test_grow.py.)"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moegrow.params import trees
from moegrow.surgery import rules as T

KEY = jax.random.PRNGKey(3)
KINDS = ("params", "mu", "nu")


def sds(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))


def build(src, target, rules, kind="params", key=KEY, **kw):
  """apply_rules -> ({path: numpy leaf}, plan)."""
  out, plan = T.apply_rules(src, target, rules, key=key, kind=kind, **kw)
  return {p: np.asarray(v) for p, v in trees.flatten(out).items()}, plan


def f32(x):
  return np.asarray(x, np.float32)


A = f32([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])


# ---------------------------------------------------------------- copy / scale

def test_copy_is_identity_for_every_kind_and_expands_templates():
  src = {"a": {"x": A}, "old": {"3": f32([7.0, 8.0])}}
  target = {"a": {"x": sds(2, 3)}, "new": {"3": sds(2)}}
  rules = [(r"new/(\d+)", T.copy(r"old/\1")), (".*", T.copy())]
  for kind in KINDS:
    out, plan = build(src, target, rules, kind)
    np.testing.assert_array_equal(out["a/x"], A)
    np.testing.assert_array_equal(out["new/3"], [7.0, 8.0])
  assert plan["new/3"][1] == ["old/3"] and plan["a/x"][1] == ["a/x"]
  assert plan["a/x"][0].preserves and plan["a/x"][0].name == "copy"


@pytest.mark.parametrize("c", [3.0, -0.5])
def test_scaled_copy_multiplies_params_and_mu_by_c_and_nu_by_c_squared(c):
  want = {"params": A * c, "mu": A * c, "nu": A * c * c}
  for kind in KINDS:
    out, plan = build({"w": A}, {"w": sds(2, 3)}, [("w", T.copy(scale=c))], kind)
    np.testing.assert_allclose(out["w"], want[kind], rtol=1e-6)
  act = plan["w"][0]
  assert act.name == "scale" and not act.preserves  # a scaled leaf is not an unmodified copy


def test_scaled_helper():
  np.testing.assert_array_equal(T.scaled(A, "nu", None), A)
  np.testing.assert_allclose(T.scaled(A, "nu", 2.0), 4 * A)
  np.testing.assert_allclose(T.scaled(A, "mu", 2.0), 2 * A)


# ---------------------------------------------------------------- init

@pytest.mark.parametrize("dist, kw, value", [("zeros", {}, 0.0), ("ones", {}, 1.0), ("constant", {"value": 2.5}, 2.5)])
def test_init_fixed_dists_and_zero_moments(dist, kw, value):
  for dtype in (jnp.float32, jnp.bfloat16):
    target = {"w": sds(3, 2, dtype=dtype)}
    for kind in KINDS:
      out, plan = build({}, target, [("w", T.init(dist, **kw))], kind)
      assert out["w"].dtype == jnp.dtype(dtype) and out["w"].shape == (3, 2)
      expect = value if kind == "params" else 0.0  # a new leaf has no optimizer history
      np.testing.assert_array_equal(out["w"].astype(np.float32), np.full((3, 2), expect, np.float32))
    assert plan["w"][0].name == f"init:{dist}" and plan["w"][1] == []


def test_init_normal_values_statistics_and_zero_moments():
  target = {"w": sds(128, 64)}
  out, _ = build({}, target, [("w", T.init("normal", std=0.1, mean=1.0))])
  w = out["w"]
  # Exactly mean + std * N(0, 1) drawn with the leaf's own key ...
  ref = 1.0 + 0.1 * np.asarray(jax.random.normal(T.leaf_key(KEY, "w"), (128, 64), jnp.float32))
  np.testing.assert_allclose(w, ref, rtol=1e-6)
  # ... which has the requested statistics.
  assert abs(w.mean() - 1.0) < 0.01 and abs(w.std() - 0.1) < 0.005
  for kind in ("mu", "nu"):
    out, _ = build({}, target, [("w", T.init("normal", std=0.1, mean=1.0))], kind)
    assert not out["w"].any()


def test_init_keys_depend_on_path_and_key_not_on_other_leaves():
  rule = [(".*", T.init("normal"))]
  both, _ = build({}, {"a": sds(16), "b": sds(16)}, rule)
  alone, _ = build({}, {"a": sds(16)}, rule)
  other, _ = build({}, {"a": sds(16)}, rule, key=jax.random.PRNGKey(4))
  np.testing.assert_array_equal(both["a"], alone["a"])  # adding a leaf does not reshuffle the others
  assert not np.allclose(both["a"], both["b"])  # two paths, two draws
  assert not np.allclose(alone["a"], other["a"])
  again, _ = build({}, {"a": sds(16)}, rule)
  np.testing.assert_array_equal(again["a"], alone["a"])  # deterministic


def test_init_rejects_unknown_dist():
  with pytest.raises(ValueError, match=r"unknown dist 'uniform'"):
    T.init("uniform")
  with pytest.raises(ValueError, match=r"unknown dist 'uniform'"):
    T.pad("w", dist="uniform").fn("params", KEY, [A], sds(3, 3))


# ---------------------------------------------------------------- stack / tile

def test_stack_new_axis_for_every_kind():
  for kind in KINDS:
    out, _ = build({"w": A}, {"e": sds(4, 2, 3)}, [("e", T.stack("w", 4))], kind)
    for i in range(4):
      np.testing.assert_array_equal(out["e"][i], A)
  out, _ = build({"w": A}, {"e": sds(2, 3, 3)}, [("e", T.stack("w", 3, axis=2))])
  for i in range(3):
    np.testing.assert_array_equal(out["e"][:, :, i], A)


def test_tile_concatenates_along_existing_axis():
  out, _ = build({"v": f32([1, 2])}, {"t": sds(6)}, [("t", T.tile("v", 3))], "nu")
  np.testing.assert_array_equal(out["t"], [1, 2, 1, 2, 1, 2])
  out, _ = build({"w": A}, {"t": sds(2, 6)}, [("t", T.tile("w", 2, axis=1))])
  np.testing.assert_array_equal(out["t"], [[1, -2, 3, 1, -2, 3], [4, 5, -6, 4, 5, -6]])
  out, _ = build({"w": A}, {"t": sds(4, 3)}, [("t", T.tile("w", 2, axis=0))])
  np.testing.assert_array_equal(out["t"], [[1, -2, 3], [4, 5, -6], [1, -2, 3], [4, 5, -6]])


# ---------------------------------------------------------------- pad

def test_pad_puts_source_in_leading_corner_rest_from_init():
  src = {"w": f32([[1, 2], [3, 4]])}
  rule = [("w", T.pad("w", dist="constant", value=9.0))]
  out, _ = build(src, {"w": sds(3, 4)}, rule, "params")
  np.testing.assert_array_equal(out["w"], [[1, 2, 9, 9], [3, 4, 9, 9], [9, 9, 9, 9]])
  for kind in ("mu", "nu"):  # moments: the carried corner, zeros elsewhere
    out, _ = build(src, {"w": sds(3, 4)}, rule, kind)
    np.testing.assert_array_equal(out["w"], [[1, 2, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0]])
  out, _ = build(src, {"w": sds(2, 3)}, [("w", T.pad("w"))])  # default: zeros
  np.testing.assert_array_equal(out["w"], [[1, 2, 0], [3, 4, 0]])


def test_pad_scale_applies_to_the_corner_only():
  src = {"w": f32([[1, 2], [3, 4]])}
  rule = [("w", T.pad("w", dist="constant", value=9.0, scale=2.0))]
  params, _ = build(src, {"w": sds(2, 3)}, rule, "params")
  mu, _ = build(src, {"w": sds(2, 3)}, rule, "mu")
  nu, _ = build(src, {"w": sds(2, 3)}, rule, "nu")
  np.testing.assert_array_equal(params["w"], [[2, 4, 9], [6, 8, 9]])
  np.testing.assert_array_equal(mu["w"], [[2, 4, 0], [6, 8, 0]])
  np.testing.assert_array_equal(nu["w"], [[4, 8, 0], [12, 16, 0]])


def test_pad_normal_rest_is_the_init_draw_and_casts_to_target_dtype():
  src = {"w": f32([[1, 2], [3, 4]])}
  out, _ = build(src, {"w": sds(3, 3)}, [("w", T.pad("w", dist="normal", std=0.5))])
  ref = 0.5 * np.asarray(jax.random.normal(T.leaf_key(KEY, "w"), (3, 3), jnp.float32))
  ref[:2, :2] = [[1, 2], [3, 4]]
  np.testing.assert_allclose(out["w"], ref, rtol=1e-6)
  out, _ = build(src, {"w": sds(2, 4, dtype=jnp.bfloat16)}, [("w", T.pad("w"))])
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(out["w"].astype(np.float32), [[1, 2, 0, 0], [3, 4, 0, 0]])


@pytest.mark.parametrize("src_shape, target_shape", [((3, 2), (2, 4)), ((2,), (2, 3)), ((2, 2, 1), (2, 2))])
def test_pad_rejects_sources_that_do_not_fit(src_shape, target_shape):
  src = {"w": np.ones(src_shape, np.float32)}
  with pytest.raises(ValueError, match=rf"pad: source {src_shape!r} does not fit in target {target_shape!r}".replace(
      "(", r"\(").replace(")", r"\)")):
    build(src, {"w": sds(*target_shape)}, [("w", T.pad("w"))])


# ---------------------------------------------------------------- compute / drop / order

def test_compute_gets_kind_key_and_sources_in_order():
  src = {"p": {"x1": f32([5, 7]), "y1": f32([2, 3])}}
  seen = []

  def fn(kind, key, x, y):
    seen.append((kind, tuple(np.asarray(key).ravel())))
    return x - y if kind == "params" else x * y

  rules = [(r"d/(\d)", T.compute([r"p/x\1", r"p/y\1"], fn, name="diff"))]
  out, plan = build(src, {"d": {"1": sds(2)}}, rules, "params")
  np.testing.assert_array_equal(out["d/1"], [3, 4])
  out, _ = build(src, {"d": {"1": sds(2)}}, rules, "mu")
  np.testing.assert_array_equal(out["d/1"], [10, 21])
  assert plan["d/1"][0].name == "diff" and plan["d/1"][1] == ["p/x1", "p/y1"]
  # The key handed to the action is the leaf's own key.
  want = tuple(np.asarray(T.leaf_key(KEY, "d/1")).ravel())
  assert [k for _, k in seen] == [want, want] and [k for k, _ in seen] == ["params", "mu"]


def test_drop_rules_match_sources_only():
  src = {"keep": A, "old": f32([1.0]), "older": f32([2.0])}
  target = {"keep": sds(2, 3)}
  # A drop rule first, matching everything, must not swallow the target leaf.
  out, plan = build(src, target, [(".*", T.drop()), (".*", T.copy())])
  np.testing.assert_array_equal(out["keep"], A)
  assert list(plan) == ["keep"]
  # Patterns are fullmatched: "old" does not drop "older".
  with pytest.raises(ValueError, match=r"neither used nor dropped: \['older'\]"):
    build(src, target, [("old", T.drop()), ("keep", T.copy())])


def test_first_matching_rule_wins():
  out, plan = build({}, {"w": sds(2)}, [("w", T.init("ones")), ("w", T.init("zeros")), (".*", T.init("constant",
                                                                                                   value=3.0))])
  np.testing.assert_array_equal(out["w"], [1, 1])
  out, _ = build({"w": f32([4, 5])}, {"w": sds(2), "v": sds(2)},
                 [("w", T.copy(scale=2.0)), (".*", T.init("constant", value=3.0))])
  np.testing.assert_array_equal(out["w"], [8, 10])
  np.testing.assert_array_equal(out["v"], [3, 3])


# ---------------------------------------------------------------- strictness and planning

def test_one_error_lists_every_kind_of_problem():
  src = {"used": A, "stray": A, "blocks": {"10": {"w": A}, "2": {"w": A}}}
  target = {"t": sds(2, 3), "u": sds(2, 3), "blocks": {"10": {"w": sds(2, 3)}, "2": {"w": sds(2, 3)}},
            "orphan": sds(1)}
  rules = [("t", T.copy("used")), ("u", T.copy("nope")), (r"blocks/\d+/w", T.copy(r"blocks/9/w"))]
  with pytest.raises(ValueError) as err:
    T.plan_rules(list(trees.flatten(src)), list(trees.flatten(target)), rules)
  msg = str(err.value)
  assert msg.startswith("incomplete rule set")
  assert "target leaves produced by no rule: ['orphan']" in msg
  # Targets in natural order: blocks/2 before blocks/10.
  assert ("rules read source leaves that do not exist: ['blocks/2/w <- blocks/9/w (copy)', "
          "'blocks/10/w <- blocks/9/w (copy)', 'u <- nope (copy)']") in msg
  assert "source leaves neither used nor dropped: ['blocks/2/w', 'blocks/10/w', 'stray']" in msg


def test_wrong_shapes_and_dtypes_are_listed_together():
  src = {"a": A, "b": f32([1, 2])}
  target = {"a": sds(2, 3, dtype=jnp.bfloat16), "b": sds(4)}
  with pytest.raises(ValueError) as err:
    build(src, target, [(".*", T.copy())])
  msg = str(err.value)
  assert "a (copy of ['a']): got (2, 3) float32, want (2, 3) bfloat16" in msg
  assert "b (copy of ['b']): got (2,) float32, want (4,) float32" in msg
  # check_dtype=False forgives the dtype (not the shape) and keeps the produced leaf.
  out, _ = build(src, {"a": target["a"], "b": sds(2)}, [(".*", T.copy())], check_dtype=False)
  assert out["a"].dtype == np.float32
  with pytest.raises(ValueError, match=r"b \(copy of \['b'\]\): got \(2,\)"):
    build(src, target, [(".*", T.copy())], check_dtype=False)


def test_plan_rules_maps_targets_to_actions_and_sources():
  plan = T.plan_rules(["x/10", "x/2", "y"], ["w/10", "w/2", "z"],
                      [(r"w/(\d+)", T.tile(r"x/\1", 2)), ("z", T.init("zeros")), ("y", T.drop())])
  assert list(plan) == ["w/2", "w/10", "z"]
  assert {t: (a.name, s) for t, (a, s) in plan.items()} == {
      "w/2": ("tile", ["x/2"]), "w/10": ("tile", ["x/10"]), "z": ("init:zeros", [])}
  assert T.describe_plan(plan) == {"w/2": {"action": "tile", "from": ["x/2"]},
                                   "w/10": {"action": "tile", "from": ["x/10"]},
                                   "z": {"action": "init:zeros", "from": []}}
  json.dumps(T.describe_plan(plan))
  with pytest.raises(ValueError, match=r"rule 'z': action must be an Action, got str"):
    T.plan_rules([], ["z"], [("z", "copy")])


def test_apply_rules_rejects_unknown_kind_and_accepts_flat_trees():
  with pytest.raises(ValueError, match=r"kind='adam' not in \('params', 'mu', 'nu', 'fisher'\)"):
    T.apply_rules({"w": A}, {"w": sds(2, 3)}, [(".*", T.copy())], kind="adam")
  out, _ = T.apply_rules({"a/b": A}, {"a/b": sds(2, 3)}, [(".*", T.copy(scale=2.0))], kind="nu")
  np.testing.assert_array_equal(np.asarray(out["a"]["b"]), 4 * A)  # flat in, nested out
  out, _ = T.apply_rules({"a/b": A}, {"a/b": sds(2, 3)}, [(".*", T.copy(scale=2.0))], kind="fisher")
  np.testing.assert_array_equal(np.asarray(out["a"]["b"]), 4 * A)  # a Fisher scales like nu


def test_actions_jit_like_eager():
  src = {"w": f32([[1, 2], [3, 4]]), "v": f32([1, 2])}
  target = {"w": sds(3, 3), "v": sds(3, 2), "n": sds(5)}
  rules = [("w", T.pad("w", dist="normal", scale=0.5)), ("v", T.stack("v", 3)), ("n", T.init("normal"))]
  for kind in KINDS:
    eager = T.apply_rules(src, target, rules, KEY, kind)[0]
    jitted = jax.jit(lambda s, k: T.apply_rules(s, target, rules, k, kind)[0])(src, KEY)
    for p, x in trees.flatten(eager).items():
      np.testing.assert_allclose(np.asarray(trees.flatten(jitted)[p]), np.asarray(x), rtol=1e-6, err_msg=p)


# ---------------------------------------------------------------- moegrow.params.trees

def test_flatten_unflatten_round_trip():
  tree = {"embed": 1, "blocks": {"0": {"mlp": {"w": 2, "b": None}}, "10": {"attn": {"q": 3}}}, "z": {"y": {"x": 4}}}
  flat = trees.flatten(tree)
  assert flat == {"embed": 1, "blocks/0/mlp/w": 2, "blocks/0/mlp/b": None, "blocks/10/attn/q": 3, "z/y/x": 4}
  assert trees.unflatten(flat) == tree
  assert trees.unflatten(trees.flatten(tree, sep="."), sep=".") == tree
  assert "blocks.0.mlp.w" in trees.flatten(tree, sep=".")


def test_flatten_of_flat_dict_is_a_copy():
  flat = {"a/b": 1, "c": 2}
  out = trees.flatten(flat)
  assert out == flat and out is not flat
  out["c"] = 3
  assert flat["c"] == 2


@pytest.mark.parametrize("tree, match", [
    ({"x": {"a/b": 1}}, r"key 'a/b' under 'x' must be a non-empty str without '/'"),
    ({"x": {0: 1}}, r"key 0 under 'x'"),
    ({"x": {"": 1}}, r"key '' under 'x'"),
])
def test_flatten_rejects_bad_keys(tree, match):
  with pytest.raises(ValueError, match=match):
    trees.flatten(tree)


def test_unflatten_rejects_conflicting_paths():
  with pytest.raises(ValueError, match=r"'a/b' is below a leaf"):
    trees.unflatten({"a": 1, "a/b": 2})
  with pytest.raises(ValueError, match=r"'a' given twice or is a prefix of another path"):
    trees.unflatten({"a/b": 1, "a": 2})


def test_natural_key_orders_numbers_as_numbers():
  paths = ["blocks/10/w", "blocks/2/w", "embed", "blocks/1/w", "blocks/2/v", "w10", "w2", "blocks/9/w"]
  assert sorted(paths, key=trees.natural_key) == [
      "blocks/1/w", "blocks/2/v", "blocks/2/w", "blocks/9/w", "blocks/10/w", "embed", "w2", "w10"]
  assert trees.natural_key("blocks/007") == trees.natural_key("blocks/7")  # numbers by value


def test_check_tree_names_missing_unexpected_and_mismatched_paths():
  abstract = {"a": sds(2, 3), "blocks": {"2": {"w": sds(4)}, "10": {"w": sds(4)}}, "n": sds(1, dtype=jnp.int32)}
  tree = {"a": np.zeros((3, 2), np.float32), "blocks": {"10": {"w": np.zeros(4, np.float32)}},
          "n": np.zeros(1, np.float32), "extra": np.zeros(1)}
  with pytest.raises(ValueError) as err:
    trees.check_tree(tree, abstract, what="params")
  lines = str(err.value).splitlines()
  assert lines[0] == "params does not match the expected tree:"
  assert lines[1:] == ["  missing leaves: ['blocks/2/w']", "  unexpected leaves: ['extra']",
                       "  a: got (3, 2) float32, want (2, 3) float32", "  n: got (1,) float32, want (1,) int32"]
  # Without dtypes, only shapes count; a flat abstract tree works as well.
  with pytest.raises(ValueError) as err:
    trees.check_tree(tree, trees.flatten(abstract), check_dtype=False)
  msg = str(err.value)
  assert "a: got (3, 2), want (2, 3)" in msg and "n:" not in msg
  trees.check_tree({"n": np.zeros(1, np.float32)}, {"n": sds(1, dtype=jnp.int32)}, check_dtype=False)
  with pytest.raises(ValueError, match="n: got"):
    trees.check_tree({"n": np.zeros(1, np.float32)}, {"n": sds(1, dtype=jnp.int32)})


def test_to_plain_nested_containers():
  tree = {"a": (1, [2, {"b": (3,)}]), 1: "x", "m": ml_collections.ConfigDict({"k": (4, 5), "sub": {"j": 6}})}
  assert trees.to_plain(tree) == {"a": [1, [2, {"b": [3]}]], "1": "x", "m": {"k": [4, 5], "sub": {"j": 6}}}
  kept = trees.to_plain(tree, sequences=False)
  assert kept["a"] == (1, [2, {"b": (3,)}]) and isinstance(kept["a"], tuple)
  assert kept["m"]["k"] == (4, 5) and isinstance(kept["m"]["k"], tuple)
  assert isinstance(kept["m"], dict) and isinstance(kept["m"]["sub"], dict)
  # The leaf function sees leaves only (sequences are walked into), or whole sequences with sequences=False.
  assert trees.to_plain({"a": [1, 2], "b": 3}, leaf=lambda x: x * 10) == {"a": [10, 20], "b": 30}
  assert trees.to_plain({"a": (1, 2)}, leaf=lambda x: x * 2, sequences=False) == {"a": (1, 2, 1, 2)}
  arr = np.arange(3)
  assert trees.to_plain({"x": arr})["x"] is arr  # arrays are leaves, not walked


def test_json_leaf():
  assert trees.json_leaf(np.arange(6).reshape(2, 3)) == [[0, 1, 2], [3, 4, 5]]
  assert trees.json_leaf(jnp.array([0.5, 1.5])) == [0.5, 1.5]
  x = trees.json_leaf(np.float32(1.5))
  assert x == 1.5 and type(x) is float
  n = trees.json_leaf(np.int64(3))
  assert n == 3 and type(n) is int
  z = trees.json_leaf(np.array(2.0))
  assert z == 2.0 and type(z) is float
  assert trees.json_leaf("s") == "s" and trees.json_leaf(None) is None
  tree = {"w": jnp.ones((2,)), "s": np.float32(0.25), "meta": {"n": np.int32(7), "t": (1, 2)}}
  text = json.dumps(trees.to_plain(tree, trees.json_leaf))
  assert json.loads(text) == {"w": [1.0, 1.0], "s": 0.25, "meta": {"n": 7, "t": [1, 2]}}
