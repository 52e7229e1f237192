"""experiments/stacking (G_stack: when to grow 2 -> 4 layers) run end to end in its --quick mode (one
seed, in process) on the real corpora: outputs for every arm, the growth certificates at each
switch step, and the FLOPs-saved numbers recomputed here from the runs' own evaluations and the
CSV's FLOPs."""
import contextlib
import io
import json
import math
import os

import numpy as np
import pytest

from experiments import harness
from _tiny import check_png, csv_rows, num
from experiments.stacking import figure as stacking

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run

SEEDS = (0,)  # one seed: the mean ± SE over seeds is checked on the committed 3-seed results
DOMAINS = ("python_stdlib", "shakespeare_plays")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
  """The figure's command line, in this process (the compiled steps of earlier tests are reused)."""
  workdir = str(tmp_path_factory.mktemp("stacking") / "run")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = harness.run(stacking.figure, ["--quick", "--seeds=0", f"--workdir={workdir}", f"--data_dir={data_dir}"])
  assert code == 0, out.getvalue()[-3000:]
  return stacking.figure(True), workdir, out.getvalue()


def test_outputs_hold_every_arm_and_seed(quick):
  fig, root, stdout = quick
  arms = {a.name for a in fig.arms}
  assert arms == {"shallow", "deep_scratch", "stack10", "stack25", "stack50"}
  rows = csv_rows(os.path.join(root, "stacking.csv"))
  assert {(r["arm"], int(r["seed"])) for r in rows} == {(a, s) for a in arms for s in SEEDS}
  assert all(math.isfinite(float(r["loss"])) for r in rows)
  assert {"mean", *DOMAINS} == {r["domain"] for r in rows}
  T, sw = fig.plan["total_steps"], fig.plan["switch_steps"]
  for a in arms:
    for s in SEEDS:
      mine = [r for r in rows if r["arm"] == a and int(r["seed"]) == s and r["domain"] == "mean"]
      xs = [float(r["x"]) for r in mine]
      assert len(xs) >= 2 and all(b > x for x, b in zip(xs, xs[1:])), f"{a}/{s}: {xs}"
      steps = [int(r["step"]) for r in mine]
      want_end = max(sw.values()) if a == "shallow" else T
      assert steps[-1] == want_end, f"{a}/{s}: ends at {steps[-1]}, not {want_end}"
      if a in sw:
        assert steps[0] == sw[a], f"{a}/{s}: the curve starts at {steps[0]}, not its switch step {sw[a]}"
  # equal tokens, fewer FLOPs: every grown run ends at T having spent less than deep_scratch, and
  # growing later spends less
  end_flops = {a: float(next(r["flops"] for r in rows if r["arm"] == a and int(r["seed"]) == 0
                             and int(r["step"]) == T)) for a in ("deep_scratch", *stacking.GROWN)}
  assert end_flops["deep_scratch"] > end_flops["stack10"] > end_flops["stack25"] > end_flops["stack50"], end_flops
  check_png(os.path.join(root, "stacking.png"))
  summary = open(os.path.join(root, "summary.md")).read()
  assert all(f"| {a} | mean | 1 |" in summary for a in arms), summary
  assert all(c.text in summary for c in fig.claims)
  saved_md = open(os.path.join(root, "flops_saved_summary.md")).read()
  assert all(f"| {a} | {sw[a]} | 1 | " in saved_md for a in stacking.GROWN), saved_md
  assert "FLOPs to reach the deep-from-scratch model's final loss" in stdout


def test_growth_certificate_at_each_switch_step(quick):
  fig, root, _ = quick
  sw = fig.plan["switch_steps"]
  for arm, S in sw.items():
    for s in SEEDS:
      wd = os.path.join(root, arm, f"seed{s}")
      certs = sorted(os.listdir(os.path.join(wd, "growth")))
      assert certs == [f"{S}.json"], f"{arm}/{s}: certificates {certs}"
      with open(os.path.join(wd, "growth", f"{S}.json")) as f:
        cert = json.load(f)
      assert cert["step"] == S and set(cert["loss_change"]) == set(DOMAINS)
      assert [o["op"] for o in cert["ops"]] == ["stack"], cert["ops"]
      # G_stack is not function-preserving: the boundary changes the held-out loss
      assert np.mean([abs(cert["loss_change"][d]) for d in DOMAINS]) > 1e-4, f"{arm}/{s}: {cert['loss_change']}"
      # the model before the growth is shallow's at S (same seed): the certificate's evaluation of
      # it on the full held-out set is shallow's own evaluation at S
      shallow = harness.read_evals(os.path.join(root, "shallow", f"seed{s}"))
      for d in DOMAINS:
        assert cert["eval_before"][d] == pytest.approx(shallow[S][d], abs=1e-4), f"{arm}/{s} {d}"
  for s in SEEDS:  # no growth in the runs that never grow
    for arm in ("shallow", "deep_scratch"):
      assert not os.path.exists(os.path.join(root, arm, f"seed{s}", "growth")), f"{arm}/{s} grew"


def _reach(points, target):
  """First FLOPs with loss <= target, interpolated linearly between evaluations; nan = never."""
  prev = None
  for f, loss in points:
    if loss <= target:
      if prev is None:
        return f
      return prev[0] + (prev[1] - target) * (f - prev[0]) / (prev[1] - loss)
    prev = (f, loss)
  return math.nan


def test_flops_saved_follows_from_the_runs(quick):
  fig, root, _ = quick
  sw, T = fig.plan["switch_steps"], fig.plan["total_steps"]
  flops = {(r["arm"], int(r["seed"]), int(r["step"])): float(r["flops"])
           for r in csv_rows(os.path.join(root, "stacking.csv")) if r["domain"] == "mean"}
  rows = csv_rows(os.path.join(root, "flops_saved.csv"))
  assert {(r["arm"], int(r["seed"])) for r in rows} == {(a, s) for a in stacking.GROWN for s in SEEDS}
  checked = 0
  for r in rows:
    arm, seed = r["arm"], int(r["seed"])
    S = sw[arm]
    scratch_ev = harness.read_evals(os.path.join(root, "deep_scratch", f"seed{seed}"))
    scratch = [(flops[("deep_scratch", seed, t)], np.mean([scratch_ev[t][d] for d in DOMAINS]))
               for t in sorted(scratch_ev)]
    assert max(scratch_ev) == T
    L_star = scratch[-1][1]
    F_scratch = _reach(scratch, L_star)
    # the grown run's curve: shallow's evaluation at S, then its own after S
    own = harness.read_evals(os.path.join(root, arm, f"seed{seed}"))
    src = harness.read_evals(os.path.join(root, "shallow", f"seed{seed}"))
    ev = {S: src[S], **{t: e for t, e in own.items() if t > S}}
    assert max(ev) == T and len(ev) >= 2
    grown = [(flops[(arm, seed, t)], np.mean([ev[t][d] for d in DOMAINS])) for t in sorted(ev)]
    F_grown = _reach(grown, L_star)
    want = {"switch_step": S, "L_star": L_star, "F_scratch": F_scratch, "F_grown": F_grown,
            "saved": 1 - F_grown / F_scratch, "final_loss": grown[-1][1], "final_flops": grown[-1][0]}
    for k, v in want.items():
      got = num(r[k])
      if math.isnan(v):
        assert math.isnan(got), f"{arm}/{seed} {k}: {r[k]} vs never"
      else:
        assert got == pytest.approx(v, rel=1e-6, abs=1e-9), f"{arm}/{seed} {k}: {r[k]} vs {v}"
        checked += k == "F_grown"
    assert F_scratch <= flops[("deep_scratch", seed, T)]
  print(f"flops_saved: {checked}/{len(rows)} grown runs reached L*")
  # the summary's 'never' counts are those of the CSV
  md = open(os.path.join(root, "flops_saved_summary.md")).read()
  for a in stacking.GROWN:
    never = sum(1 for r in rows if r["arm"] == a and math.isnan(num(r["F_grown"])))
    assert f"| {a} | {sw[a]} | {len(SEEDS)} | {never}/{len(SEEDS)} |" in md, md


def test_first_reach_interpolates():
  pts = [(0.0, 3.0), (10.0, 2.0), (20.0, 1.0)]
  assert stacking.first_reach(pts, 1.5) == pytest.approx(15.0)
  assert stacking.first_reach(pts, 3.0) == 0.0
  assert stacking.first_reach(pts, 1.0) == pytest.approx(20.0)
  assert math.isnan(stacking.first_reach(pts, 0.5))
  assert stacking.first_reach([(0.0, 3.0), (10.0, 1.0), (20.0, 2.5)], 2.0) == pytest.approx(5.0)  # the first crossing
