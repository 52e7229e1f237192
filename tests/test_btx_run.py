"""Branch-Train-MiX as one config: real seed checkpoint, two real branch runs, the mix, the MoE's
training; every part resumes, the seed is only read."""
import json
import os

import jax
import numpy as np
import pytest

from moegrow.orchestrate import branching, merging, parts, stages
from moegrow.params import trees
from moegrow.train import probes
from _tiny import digest, read_metrics, train_config

OLD, NEW = "shakespeare_plays", "python_stdlib"


def btx_config(data_dir, seed_dir, router="hidden"):
  c = train_config(data_dir, steps=3, eval_every=3, eval_batches=1, checkpoint_every=3)
  c.btx = dict(seed=seed_dir, branches=[dict(name="old", mixture={OLD: 1.0}, steps=3),
                                        dict(name="new", mixture={NEW: 1.0}, steps=3, train=dict(lr=3e-3))],
               layers=[1], top_k=1, gating="softmax_topk", router=router)
  return c


@pytest.fixture(scope="module")
def btx_run(tmp_path_factory, data_dir, tiny_run):
  root = tmp_path_factory.mktemp("btx")
  seed_dir = tiny_run(0, root / "seed")  # a finished dense run: 4 steps, a checkpoint at step 4
  before = digest(seed_dir)
  c = btx_config(data_dir, seed_dir)
  wd = str(root / "btx")
  result = branching.btx_run(c, wd)
  return c, wd, seed_dir, before, result


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_branches_are_ordinary_runs_from_the_seed(btx_run):
  c, wd, seed_dir, before, result = btx_run
  assert digest(seed_dir) == before  # the seed is only read
  for name, steps in (("old", 7), ("new", 7)):
    rows = read_metrics(branching.branch_dir(wd, name))
    assert max(r["step"] for r in rows) == steps  # seed step 4 + 3 branch steps
  new_rows = [r for r in read_metrics(branching.branch_dir(wd, "new")) if "lr" in r]
  old_rows = [r for r in read_metrics(branching.branch_dir(wd, "old")) if "lr" in r]
  if new_rows and old_rows:  # the branch's train override reached its run
    assert new_rows[-1]["lr"] != old_rows[-1]["lr"]


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_the_mix_maps_branch_e_to_expert_e_and_routes_by_domain(btx_run):
  c, wd, _, _, result = btx_run
  mesh = parts.make_mesh(c)
  seed_step = 4
  branch = [trees.flatten(jax.device_get(merging.restore_params(
      os.path.join(branching.branch_dir(wd, b["name"]), "checkpoints"), mesh,
      branching.branch_config(c, b, seed_step).train)[0])) for b in c.btx.branches]
  moe = branching.mixed_run_config(c)
  mixed = trees.flatten(jax.device_get(merging.restore_params(os.path.join(wd, "checkpoints", "0"), mesh,
                                                              moe.train)[0]))
  for e in range(2):
    np.testing.assert_array_equal(mixed["blocks/1/mlp/wact_EDF"][e], branch[e]["blocks/1/mlp/wact_DF"])
    np.testing.assert_array_equal(mixed["blocks/1/mlp/wo_EFD"][e], branch[e]["blocks/1/mlp/wo_FD"])
  for k in ("embed_VD", "blocks/0/mlp/wact_DF"):
    np.testing.assert_allclose(mixed[k], (branch[0][k] + branch[1][k]) / 2, rtol=1e-6, err_msg=k)
  # the hidden-state router columns, recomputed by hand from the branches' average
  evals = parts.eval_sets(moe, [OLD, NEW])
  avg = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *[trees.unflatten(b) for b in branch])
  means = probes.mlp_input_means(parts.model_config(c), avg, evals, mesh)
  cols = []
  for e, dom in enumerate((OLD, NEW)):
    c_e, c_o = np.asarray(means["1"][dom], np.float64), np.asarray(means["1"][(NEW, OLD)[e]], np.float64)
    cols.append((c_e - c_o) / np.linalg.norm(c_e - c_o))
  np.testing.assert_allclose(mixed["blocks/1/mlp/router_DE"], np.stack(cols, 1), rtol=1e-4, atol=1e-6)
  m = (np.asarray(means["1"][OLD], np.float64) + np.asarray(means["1"][NEW], np.float64)) / 2
  np.testing.assert_allclose(mixed["blocks/1/mlp/router_bias_E"], -m @ np.stack(cols, 1), rtol=1e-4, atol=1e-5)
  cert = result["btx"]
  assert set(cert["losses"]) == {"seed", "branch old", "branch new", "mix"}
  assert cert["path_map"]["blocks/1/mlp/wact_EDF"] == ["branch 0: blocks/1/mlp/wact_DF", "branch 1: blocks/1/mlp/wact_DF"]
  # hidden-state routing sends most of each domain's tokens to its own branch's expert
  assert cert["routing"][OLD]["1"][0] > 0.5 and cert["routing"][NEW]["1"][1] > 0.5, cert["routing"]


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_the_moe_trains_and_everything_resumes(btx_run, data_dir):
  c, wd, seed_dir, before, result = btx_run
  assert result["step"] == 3 and np.isfinite(result[f"eval/{NEW}/loss"])
  stamps = {p: os.path.getmtime(p) for p in [os.path.join(wd, "btx.json"), os.path.join(wd, "metrics.jsonl")]}
  again = branching.btx_run(c, wd)  # finished: nothing is retrained or re-mixed
  assert again["step"] == 3
  assert {p: os.path.getmtime(p) for p in stamps} == stamps
  with open(os.path.join(wd, "btx.json")) as f:
    assert json.load(f)["router"] == "hidden"


def test_bad_btx_sections_name_the_field(tmp_path, data_dir):
  c = btx_config(data_dir, str(tmp_path / "missing"))
  c.btx.branches = c.btx.branches[:1]
  with pytest.raises(ValueError, match="btx.branches: need 2 or more"):
    branching.btx_run(c, str(tmp_path / "w"))
  c = btx_config(data_dir, str(tmp_path / "missing"))
  c.btx.router = "centroid"
  with pytest.raises(ValueError, match="btx.router='centroid'"):
    branching.btx_run(c, str(tmp_path / "w"))
  c = btx_config(data_dir, str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="missing"):
    branching.btx_run(c, str(tmp_path / "w"))


def test_a_seed_of_another_model_is_refused(tmp_path, data_dir):
  seed_dir = str(tmp_path / "seed")
  wide = train_config(data_dir, steps=1, eval_every=0, checkpoint_every=1)
  wide.model.d_ff = 128
  stages.train_and_evaluate(wide, seed_dir)
  with pytest.raises(ValueError, match=r"different model than config.model: .*d_ff"):
    branching.btx_run(btx_config(data_dir, seed_dir), str(tmp_path / "w"))
