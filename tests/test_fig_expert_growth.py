"""The expert-growth figure (experiments/expert_growth) run end to end in its --quick mode (one seed,
in process) on the real corpora: its curves, its gap closure recomputed from the runs' own
evaluations, and the growth certificate of every grown arm at its switch step."""
import contextlib
import io
import json
import math
import os

import numpy as np
import pytest

from experiments import harness
from experiments.expert_growth import config as eg_config
from experiments.expert_growth import figure as eg
from _tiny import FIGURE_SIZE, check_png, csv_rows

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run

SEEDS = (0,)  # one seed: the mean ± SE over seeds is checked on the committed 3-seed results
ARMS = ("e2", "e4", "grow25", "grow50", "grow75")
GROWN = ("grow25", "grow50", "grow75")
DOMAINS = {"shakespeare_plays", "python_stdlib"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
  """The figure's command line, in this process (the compiled steps of earlier tests are reused)."""
  workdir = str(tmp_path_factory.mktemp("expert_growth"))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = harness.run(eg.figure, ["--quick", "--seeds=0", f"--workdir={workdir}", f"--data_dir={data_dir}"])
  assert code == 0, out.getvalue()[-3000:]
  return workdir, out.getvalue()


def test_the_figure_has_every_arm_and_seed(quick):
  workdir, stdout = quick
  rows = csv_rows(os.path.join(workdir, "expert_growth.csv"))
  assert {r["arm"] for r in rows} == set(ARMS)
  assert {int(r["seed"]) for r in rows} == set(SEEDS)
  assert {r["domain"] for r in rows} == DOMAINS | {"mean"}
  assert all(math.isfinite(float(r["loss"])) for r in rows)
  t = eg.SIZES["quick"]["steps"]
  for a in ARMS:
    for s in SEEDS:
      for d in DOMAINS | {"mean"}:
        pts = [(int(r["step"]), float(r["x"])) for r in rows if r["arm"] == a and int(r["seed"]) == s
               and r["domain"] == d]
        assert len(pts) >= 2 and pts[-1][0] == t, f"{a}/{s}/{d}: {pts}"
        assert all(b[1] > x[1] for x, b in zip(pts, pts[1:])), f"{a}/{s}/{d}: x not increasing: {pts}"
  for png in ("expert_growth.png", "gap_closure.png"):
    check_png(os.path.join(workdir, png), FIGURE_SIZE)
  summary = open(os.path.join(workdir, "summary.md")).read()
  for a in ARMS:
    assert f"| {a} | mean | 1 |" in summary, a
  for c in ("growing at 50% beats keeping 2 experts", "4 experts from the start beat growing at 75%",
            "growing earlier (25%) beats growing later (75%)"):
    assert c in summary and c in stdout, c


def test_gap_closure_is_its_definition_on_the_final_evaluations(quick):
  workdir, stdout = quick
  t = eg.SIZES["quick"]["steps"]
  final = {}
  for a in ARMS:
    for s in SEEDS:
      ev = harness.read_evals(harness.run_dir(workdir, a, s))
      assert max(ev) == t and set(ev[t]) == DOMAINS, f"{a}/{s}: evaluations at {sorted(ev)}"
      final[a, s] = float(np.mean([ev[t][d] for d in DOMAINS]))
  rows = harness.read_csv_rows(os.path.join(workdir, "gap_closure.csv"))
  assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in GROWN for s in SEEDS)
  by_arm = {}
  for r in rows:
    a, s = r["arm"], r["seed"]
    small, big, grown = final["e2", s], final["e4", s], final[a, s]
    assert r["L_small"] == pytest.approx(small, abs=1e-9)
    assert r["L_big"] == pytest.approx(big, abs=1e-9)
    assert r["L_grown"] == pytest.approx(grown, abs=1e-9)
    assert r["closure"] == pytest.approx((small - grown) / (small - big), rel=1e-9)
    assert r["switch_step"] == eg.switch_step("quick", a)
    by_arm.setdefault(a, []).append(r["closure"])
  text = open(os.path.join(workdir, "gap_closure_summary.md")).read()
  assert "gap closure" in stdout
  for a, xs in by_arm.items():  # one seed: the summary prints the closure alone
    line = next(l for l in text.splitlines() if l.startswith(f"| {a} |"))
    assert line.rstrip().endswith(f"| {xs[0]:.4f} |"), line


def test_grown_arms_grow_from_e2_at_their_switch_step(quick):
  workdir, _ = quick
  for a in ("e2", "e4"):
    for s in SEEDS:
      assert not os.path.exists(os.path.join(harness.run_dir(workdir, a, s), "growth")), f"{a}/{s} grew"
  for a in GROWN:
    n = eg.switch_step("quick", a)
    for s in SEEDS:
      wd = harness.run_dir(workdir, a, s)
      assert sorted(os.listdir(os.path.join(wd, "growth"))) == [f"{n}.json"], f"{a}/{s}"
      with open(os.path.join(wd, "growth", f"{n}.json")) as f:
        cert = json.load(f)
      assert cert["step"] == n and cert["stage"] == 1
      assert [o["op"] for o in cert["ops"]] == ["add_experts"]
      assert cert["ops"][0]["num_experts"] == 4 and cert["ops"][0]["mode"] == "copy_noise"
      (rep,) = cert["reports"]
      assert rep["old_config"]["num_experts"] == 2 and rep["new_config"]["num_experts"] == 4
      assert rep["sources"] == {"1": [0, 1]}  # uniform duplication: new expert j copies old expert j mod 2
      assert cert["params_after"] > cert["params_before"]
      assert set(cert["loss_before"]) == DOMAINS
      # it started from e2's checkpoint at n: its own evaluations begin after n, and the curve's first
      # point is e2's evaluation at n
      own = harness.read_evals(wd)
      assert min(own) > n, f"{a}/{s}: evaluations at {sorted(own)}"
      e2 = harness.read_evals(harness.run_dir(workdir, "e2", s))
      rows = [r for r in harness.read_csv(os.path.join(workdir, "expert_growth.csv"))
              if r["arm"] == a and r["seed"] == s and r["domain"] == "python_stdlib"]
      first = min(rows, key=lambda r: r["step"])
      assert first["step"] == n and first["loss"] == pytest.approx(e2[n]["python_stdlib"])


def test_config_names_every_arm_and_refuses_others():
  for a in ARMS:
    c = eg_config.get_config(f"small,{a}")
    assert c.train.steps == eg.SIZES["small"]["steps"]
  grown = eg_config.get_config("small,grow25")
  assert [s["steps"] for s in grown.stages] == [250, 750]
  assert eg_config.get_config("small,e4").model.num_experts == 4
  with pytest.raises(ValueError, match="expected '<size>,<arm>'"):
    eg_config.get_config("small,grow50_loaded")
  assert eg.closure(3.0, 2.0, 2.1) == pytest.approx(0.9)
