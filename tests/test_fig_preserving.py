"""experiments/preserving (function-preserving vs non-preserving growth) run end to end in its
--quick mode on the real corpora: outputs, the growth certificates, and the spike table's numbers
recomputed here from the runs' own logs."""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import harness
from _tiny import check_png, csv_rows, num
from experiments.preserving import figure as preserving

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1)
DOMAINS = ("python_stdlib", "shakespeare_plays")
EXACT = ("small", "wide_exact", "wide_ramped", "deep_exact", "deep_ramped")  # preserving at the boundary
RANDOM = ("wide_random", "deep_random")


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("preserving") / "run")
  t0 = time.perf_counter()
  p = subprocess.run([sys.executable, "-m", "experiments.preserving.run", "--quick", "--seeds=0,1",
                      f"--workdir={workdir}", f"--data_dir={data_dir}"], cwd=REPO, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, f"preserving --quick failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  print(f"experiments.preserving.run --quick: {time.perf_counter() - t0:.1f} s")
  fig = preserving.figure(True)
  return fig, workdir, p.stdout



def test_outputs_hold_every_arm_and_seed(quick):
  fig, root, stdout = quick
  arms = {a.name for a in fig.arms}
  assert arms == {"small", *preserving.GROWN}
  rows = csv_rows(os.path.join(root, "preserving.csv"))
  assert {(r["arm"], int(r["seed"])) for r in rows} == {(a, s) for a in arms for s in SEEDS}
  assert all(math.isfinite(float(r["loss"])) for r in rows)
  assert {"mean", *DOMAINS} == {r["domain"] for r in rows}
  for a in arms:
    for s in SEEDS:
      xs = [float(r["x"]) for r in rows if r["arm"] == a and int(r["seed"]) == s and r["domain"] == "mean"]
      assert len(xs) >= 2 and all(b > x for x, b in zip(xs, xs[1:])), f"{a}/{s}: {xs}"
  check_png(os.path.join(root, "preserving.png"))
  check_png(os.path.join(root, "spike.png"))
  summary = open(os.path.join(root, "summary.md")).read()
  assert all(f"| {a} | mean | 2 |" in summary for a in arms), summary
  assert all(c.text in summary for c in fig.claims)
  spike_md = open(os.path.join(root, "spike_summary.md")).read()
  assert all(f"| {a} | 2 |" in spike_md for a in arms) and " ± " in spike_md, spike_md
  assert "wide_random vs wide_exact" in spike_md and "deep_random vs deep_ramped" in spike_md
  assert "the loss spike at the growth step" in stdout


def test_certificate_exact_and_ramped_preserve_random_does_not(quick):
  fig, root, _ = quick
  S = fig.plan["small_steps"]
  for arm in EXACT + RANDOM:
    for s in SEEDS:
      with open(os.path.join(root, arm, f"seed{s}", "growth", f"{S}.json")) as f:
        cert = json.load(f)
      assert cert["step"] == S and set(cert["loss_change"]) == set(DOMAINS)
      change = [abs(cert["loss_change"][d]) for d in DOMAINS]
      if arm in EXACT:
        assert max(change) < 1e-5, f"{arm} seed {s}: loss change {cert['loss_change']} at a preserving growth"
      else:
        assert np.mean(change) > 1e-3, f"{arm} seed {s}: loss change {cert['loss_change']}: preserving?"


def _train(workdir):
  """step -> training loss, read directly from metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def _log(root, arm, seed, S):
  """A grown run's training losses: steps <= S from small's run of the same seed, after S its own."""
  small, own = _train(os.path.join(root, "small", f"seed{seed}")), _train(os.path.join(root, arm, f"seed{seed}"))
  return {**{t: v for t, v in small.items() if t <= S}, **{t: v for t, v in own.items() if t > S}}


def test_spike_numbers_follow_from_the_logs(quick):
  fig, root, _ = quick
  p = fig.plan
  S, w, K = p["small_steps"], p["window"], p["ramp_steps"]
  rows = csv_rows(os.path.join(root, "spike.csv"))
  assert {(r["arm"], int(r["seed"])) for r in rows} == {(a.name, s) for a in fig.arms for s in SEEDS}
  for r in rows:
    arm, seed = r["arm"], int(r["seed"])
    wd = os.path.join(root, arm, f"seed{seed}")
    assert min(_train(wd)) > S or arm == "small"
    log = _log(root, arm, seed, S)
    before = sum(log[t] for t in range(S - w + 1, S + 1)) / w
    peak = max(log[t] for t in range(S + 1, S + K + 1))
    recover = math.nan
    for k in range(1, 10_000):
      if S + k + w - 1 > max(log):
        break
      if sum(log[t] for t in range(S + k, S + k + w)) / w <= before:
        recover = k
        break
    with open(os.path.join(wd, "growth", f"{S}.json")) as f:
      cert = json.load(f)
    ev = harness.read_evals(wd)
    end = max(ev)
    config = harness.arm_config(fig, next(a for a in fig.arms if a.name == arm), seed, "")
    want = {"cert_before": np.mean([cert["loss_before"][d] for d in DOMAINS]),
            "cert_after": np.mean([cert["loss_after"][d] for d in DOMAINS]),
            "cert_change": np.mean([cert["loss_change"][d] for d in DOMAINS]),
            "train_before": before, "train_next": log[S + 1], "train_peak": peak, "spike": peak - before,
            "final_loss": np.mean(list(ev[end].values())), "final_flops": harness.flops_at(config, end)}
    for k, v in want.items():
      assert num(r[k]) == pytest.approx(v, rel=1e-6, abs=1e-9), f"{arm}/{seed} {k}: {r[k]} vs {v}"
    assert int(r["growth_step"]) == S and end == S + p["grown_steps"]
    got = num(r["recover_steps"])
    assert (math.isnan(got) and math.isnan(recover)) or got == recover, f"{arm}/{seed} recover {got} vs {recover}"
  # a preserving growth computes the same function: its first training batch (the same data as
  # small's, same seed) has small's loss
  by = {(r["arm"], int(r["seed"])): r for r in rows}
  for s in SEEDS:
    ref = num(by[("small", s)]["train_next"])
    for arm in EXACT[1:]:
      assert num(by[(arm, s)]["train_next"]) == pytest.approx(ref, abs=1e-4), f"{arm}/{s}"
    for arm in RANDOM:
      assert abs(num(by[(arm, s)]["train_next"]) - ref) > 1e-3, f"{arm}/{s}"


def test_the_spike_plot_draws_every_grown_arm_as_the_logs_mean_and_se(quick, tmp_path):
  fig, root, _ = quick
  S = fig.plan["small_steps"]
  drawn = preserving.plot_spike(str(tmp_path / "spike.png"), fig, root, SEEDS)
  grown = {a.name for a in fig.arms if a.name in preserving.GROWN + preserving.COPIES}
  assert {(d.panel, d.series) for d in drawn} == ({(k, "small") for k in ("wide", "deep")}
                                                 | {(n.split("_")[0], n) for n in grown})
  for d in drawn:
    logs = [_log(root, d.series, s, S) for s in SEEDS]
    for t, m, e in zip(d.x, d.mean, d.se):
      v = [log[int(t)] for log in logs]
      assert m == pytest.approx(np.mean(v), abs=1e-12)
      assert e == pytest.approx(np.std(v, ddof=1) / math.sqrt(len(v)), abs=1e-12)
