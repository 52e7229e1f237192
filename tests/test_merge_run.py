"""The merge command: real checkpoints in, an ordinary checkpoint out (it trains on), sources untouched."""

import jax
import numpy as np
import pytest

from moegrow.orchestrate import merging, parts, stages
from moegrow.params import trees
from _tiny import digest, train_config


@pytest.mark.slow  # slow tier: a mesh-equivalence or whole staged run (the fast tier keeps the unit tests)
def test_merge_two_runs_then_train_the_result(tmp_path, data_dir, tiny_run):
  runs = [tiny_run(seed, tmp_path / f"src{seed}") for seed in (0, 1)]  # finished runs of two seeds
  before = [digest(r) for r in runs]
  c = train_config(data_dir, steps=5, eval_every=5, checkpoint_every=5)
  c.merge = dict(sources=runs, base="", method="linear", params=dict(weights=[1.0, 3.0]), overrides=[], seed=0)
  out = str(tmp_path / "merged")
  cert = merging.merge_run(c, out)
  assert [digest(r) for r in runs] == before  # sources are only read
  assert set(cert["loss_result"]) == {"shakespeare_plays", "python_stdlib"} and len(cert["loss_sources"]) == 2
  # the saved params are the weighted average of the sources' (by hand)
  mesh = parts.make_mesh(c)
  srcs = [trees.flatten(jax.device_get(merging.restore_params(r, mesh, c.train)[0])) for r in runs]
  got = trees.flatten(jax.device_get(merging.restore_params(out, mesh, c.train)[0]))
  for k in got:
    np.testing.assert_allclose(got[k], (srcs[0][k] + 3 * srcs[1][k]) / 4, rtol=1e-6, atol=1e-7, err_msg=k)
  # an ordinary checkpoint: the run resumes from step 0 and trains to the end
  r = stages.train_and_evaluate(c, out)
  assert r["step"] == 5 and np.isfinite(r["eval/python_stdlib/loss"])
  with pytest.raises(ValueError, match="already holds checkpoints"):
    merging.merge_run(c, out)
  # ... and grows: a second stage upcycles the merged-then-trained model at its boundary
  g = train_config(data_dir, steps=0, eval_every=5, checkpoint_every=5)
  g.stages = (dict(name="merged", steps=5),
              dict(name="moe", steps=2, ops=(dict(op="upcycle", layers=[1], num_experts=2, top_k=1),)))
  r = stages.train_and_evaluate(g, out)
  assert r["stage"] == 1 and r["step"] == 7 and len(r["certificates"]) == 1
  assert all(abs(v) < 1e-5 for v in r["certificates"][0]["loss_change"].values())
  assert [digest(r) for r in runs] == before


def test_merging_different_models_names_them(tmp_path, data_dir):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  stages.train_and_evaluate(train_config(data_dir, steps=1, eval_every=0, checkpoint_every=1), a)
  wide = train_config(data_dir, steps=1, eval_every=0, checkpoint_every=1)
  wide.model.d_ff = 128
  stages.train_and_evaluate(wide, b)
  c = train_config(data_dir, steps=2)
  c.merge = dict(sources=[a, b], base="", method="linear", params={}, overrides=[], seed=0)
  with pytest.raises(ValueError, match=r"different models: .*d_ff=128"):
    merging.merge_run(c, str(tmp_path / "out"))
