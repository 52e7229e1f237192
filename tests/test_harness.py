"""The experiment harness (experiments/harness.py) by hand: compute matching against the FLOPs
formula computed by hand, and the summary's mean ± standard error against a hand computation."""
import math
import os

import pytest

from experiments import harness
from experiments.upcycling import figure as upcycling


def test_compute_matching_follows_the_formula():
  """Quick plan's step counts from a hand computation of 6 N + 12 L T H A per token."""
  d, layers, heads, hd, f, v, t, b = 64, 2, 2, 32, 256, 259, 64, 8  # configs/lm.py:tiny
  attn = 4 * d * heads * hd
  n_dense = d * v + layers * (attn + 3 * d * f)
  n_moe = d * v + layers * attn + 3 * d * f + (3 * d * 2 * f + d * 8)  # layer 1: E=8, top-2
  per_step = lambda n: (6 * n + 12 * layers * t * heads * hd) * t * b
  f_dense, f_moe = per_step(n_dense), per_step(n_moe)
  p = upcycling.plan("quick")
  assert p["flops_per_step"] == {"dense": f_dense, "moe": f_moe}
  n, m = p["dense_steps"], p["moe_steps"]
  assert p["dense_extra_steps"] == round(m * f_moe / f_dense)
  assert p["scratch_steps"] == round((n * f_dense + m * f_moe) / f_moe)
  assert p["end_step"] == {"dense_base": n, "dense": n + round(m * f_moe / f_dense), "upcycled": n + m,
                           "moe_scratch": round((n * f_dense + m * f_moe) / f_moe)}


def test_a_distilling_stage_counts_its_teachers_forward_passes():
  """The shrink figure's distilled arm: N steps of E=8, then M steps of E=4 plus one forward pass of
  the E=8 teacher per batch, 2 N + 4 L T H A per token (a third of 6 N + 12 L T H A)."""
  from experiments.shrink import figure as shrink
  d, layers, heads, hd, f, v, t, b = 64, 2, 2, 32, 256, 259, 64, 16
  attn = 4 * d * heads * hd
  n_of = lambda e: d * v + layers * attn + 3 * d * f + (3 * d * 2 * f + d * e)  # layer 1: E experts, top-2
  train = lambda e: (6 * n_of(e) + 12 * layers * t * heads * hd) * t * b
  forward = lambda e: (2 * n_of(e) + 4 * layers * t * heads * hd) * t * b
  s = shrink.SIZES["quick"]
  cfgs = shrink.configs("quick")
  end = s["pre"] + s["post"]
  plain = s["pre"] * train(8) + s["post"] * train(4)
  assert harness.flops_at(cfgs["prune_reap"], end) == pytest.approx(plain, rel=1e-12)
  assert harness.flops_at(cfgs["prune_reap_distill"], end) == pytest.approx(plain + s["post"] * forward(8), rel=1e-12)
  assert harness.flops_at(cfgs["prune_reap_distill"], s["pre"]) == pytest.approx(s["pre"] * train(8), rel=1e-12)


def test_summary_standard_error_is_the_hand_computation(tmp_path):
  rows = []
  finals = {"a": [1.0, 1.1, 1.3], "b": [1.1, 1.3, 1.6], "c": [1.05, 1.1, 1.25]}  # per seed, at the last step
  for arm, losses in finals.items():
    for seed, loss in enumerate(losses):
      for step, value in ((0, 9.0), (5, loss)):  # an early eval must not count
        rows.append({"arm": arm, "seed": seed, "step": step, "flops": step * 10.0, "x": step * 10.0,
                     "domain": "mean", "loss": value})
  path = str(tmp_path / "fixed.csv")
  harness.write_csv(path, rows, ["arm", "seed", "step", "flops", "x", "domain", "loss"])
  claims = (harness.Claim("a beats b", "a", "b"), harness.Claim("a beats c", "a", "c"))
  arm_rows, claim_rows = harness.summarize(harness.read_csv(path), claims)
  by_arm = {r["arm"]: r for r in arm_rows}
  # arm a: mean 1.1333, sample std of (1.0, 1.1, 1.3) = 0.152753, SE = 0.152753 / sqrt(3) = 0.088192
  assert by_arm["a"]["n"] == 3
  assert by_arm["a"]["mean"] == pytest.approx(3.4 / 3, abs=1e-12)
  assert by_arm["a"]["se"] == pytest.approx(0.0881917104, abs=1e-9)
  # a vs b: differences 0.1, 0.2, 0.3 -> effect 0.2, SE 0.1 / sqrt(3) = 0.057735: separated
  ab, ac = claim_rows
  assert ab["effect"] == pytest.approx(0.2, abs=1e-12) and ab["se"] == pytest.approx(0.0577350269, abs=1e-9)
  assert ab["separated"] is True
  # a vs c: differences 0.05, 0.0, -0.05 -> effect 0, SE 0.05 / sqrt(3): not separated
  assert ac["effect"] == pytest.approx(0.0, abs=1e-12) and ac["se"] == pytest.approx(0.0288675135, abs=1e-9)
  assert ac["separated"] is False
  one = harness.summarize([r for r in rows if r["seed"] == 0], claims)[1][0]
  assert one["n"] == 1 and math.isnan(one["se"]) and one["separated"] is False  # one seed separates nothing


def test_reuse_copies_a_finished_runs_directory_and_refuses_an_unfinished_one(tmp_path):
  """`Arm.reuse`: '<arm>/<subdir>' is copied from that arm's finished run of the same seed; an
  unfinished source is refused by name, and an existing copy is left as it is."""
  root = str(tmp_path)
  src = harness.run_dir(root, "btx", 3)
  os.makedirs(os.path.join(src, "branches", "a"))
  with open(os.path.join(src, "branches", "a", "metrics.jsonl"), "w") as f:
    f.write('{"step": 1}\n')
  mine = harness.run_dir(root, "btx_random", 3)
  with pytest.raises(ValueError, match="btx/branches.*not a finished run"):
    harness.copy_finished(root, "btx/branches", 3, mine)
  assert not os.path.exists(os.path.join(mine, "branches"))
  with open(os.path.join(src, "done.json"), "w") as f:
    f.write("{}")
  harness.copy_finished(root, "btx/branches", 3, mine)
  assert open(os.path.join(mine, "branches", "a", "metrics.jsonl")).read() == '{"step": 1}\n'
  assert not os.path.exists(os.path.join(mine, "branches.partial"))
  with open(os.path.join(src, "branches", "a", "metrics.jsonl"), "w") as f:
    f.write("changed\n")
  harness.copy_finished(root, "btx/branches", 3, mine)  # already there: kept
  assert open(os.path.join(mine, "branches", "a", "metrics.jsonl")).read() == '{"step": 1}\n'
