"""The experiment harness (experiments/harness.py) and the figures built on it, run end to end in
their --quick mode on the real corpora."""
import csv
import math
import os
import shutil
import subprocess
import sys

import pytest

from experiments import harness
from experiments.upcycling import figure as upcycling
from _tiny import FIGURE_SIZE, check_png, csv_rows

pytestmark = pytest.mark.slow  # slow tier: the figures' --quick runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPCYCLING_ARMS = {"dense", "upcycled", "moe_scratch"}
SEEDS = (0, 1)


def run_module(module, *args, timeout=600, ok=True):
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                     timeout=timeout)
  if ok:
    assert p.returncode == 0, f"{module} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return p


def check_results_csv(path, arms, seeds):
  """Every arm and seed, finite losses, >= 2 points per (arm, seed, domain), strictly increasing x."""
  rows = csv_rows(path)
  assert rows, f"{path} has no rows"
  assert {r["arm"] for r in rows} == set(arms), f"arms {sorted({r['arm'] for r in rows})}"
  assert {int(r["seed"]) for r in rows} == set(seeds)
  bad = [r for r in rows if not math.isfinite(float(r["loss"]))]
  assert not bad, f"non-finite losses: {bad[:3]}"
  domains = {r["domain"] for r in rows}
  assert {"mean", "shakespeare_plays", "python_stdlib"} <= domains, f"domains {sorted(domains)}"
  for a in arms:
    for s in seeds:
      for d in domains:
        xs = [float(r["x"]) for r in rows if r["arm"] == a and int(r["seed"]) == s and r["domain"] == d]
        assert len(xs) >= 2, f"{a}/{s}/{d}: {len(xs)} points"
        assert all(b > x for x, b in zip(xs, xs[1:])), f"{a}/{s}/{d}: x not increasing: {xs}"
  return rows


@pytest.fixture(scope="module")
def upcycling_quick(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("upcycling"))
  p = run_module("experiments.upcycling.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--seeds=" + ",".join(map(str, SEEDS)))
  return workdir, p.stdout


# ---------------------------------------------------------------- the harness, by hand

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


# ---------------------------------------------------------------- the upcycling figure

def test_upcycling_quick_writes_csv_png_and_summary(upcycling_quick):
  workdir, out = upcycling_quick
  check_results_csv(os.path.join(workdir, "upcycling.csv"), UPCYCLING_ARMS, SEEDS)
  check_png(os.path.join(workdir, "upcycling.png"), FIGURE_SIZE)
  assert "growth certificate" in out  # the upcycled runs grew the shared dense checkpoint
  # The shared dense checkpoint is copied, never modified: dense_base still ends at its own step.
  for s in SEEDS:
    assert sorted(os.listdir(os.path.join(workdir, "dense_base", f"seed{s}", "checkpoints"))) == ["6"]
  with open(os.path.join(workdir, "summary.md")) as f:
    summary = f.read()
  assert summary.count("| upcycling beats") == 2 and " ± " in summary
  # The summary's numbers are the CSV's: recompute one claim from the written table.
  rows = harness.read_csv(os.path.join(workdir, "upcycling.csv"))
  _, claims = harness.summarize(rows, upcycling.figure(quick=True).claims)
  written = [r for r in csv_rows(os.path.join(workdir, "summary.csv")) if r["kind"] == "claim"]
  assert [float(r["effect"]) for r in written] == pytest.approx([c["effect"] for c in claims], abs=1e-12)


def test_upcycling_rerun_skips_finished_runs(upcycling_quick, data_dir):
  workdir, _ = upcycling_quick
  runs = [os.path.join(workdir, a, f"seed{s}", "metrics.jsonl") for a in UPCYCLING_ARMS for s in SEEDS]
  sizes = {r: os.path.getsize(r) for r in runs}
  out = run_module("experiments.upcycling.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}",
                   "--seeds=" + ",".join(map(str, SEEDS))).stdout
  assert out.count("finished earlier; skipping") == 4 * len(SEEDS), out
  assert sizes == {r: os.path.getsize(r) for r in runs}


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, data_dir):
  workdir = str(tmp_path / "sweep")
  first = run_module("experiments.upcycling.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}",
                     "--seeds=0", "--stop_after_steps=4", ok=False)
  assert first.returncode == 1 and "stopped before its end" in first.stdout, first.stdout[-2000:]
  assert not os.path.exists(os.path.join(workdir, "dense_base", "seed0", "done.json"))
  second = run_module("experiments.upcycling.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}",
                      "--seeds=0").stdout
  assert "resumed from" in second and "at step 4" in second, second[-2000:]
  assert all(os.path.exists(os.path.join(workdir, a, "seed0", "done.json")) for a in ("dense_base", *UPCYCLING_ARMS))
  check_results_csv(os.path.join(workdir, "upcycling.csv"), UPCYCLING_ARMS, (0,))


def test_a_different_plan_is_refused(upcycling_quick, data_dir, tmp_path):
  workdir, _ = upcycling_quick
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  with open(os.path.join(other, "plan.json"), "w") as f:
    f.write('{"size": "small"}')
  p = run_module("experiments.upcycling.run", "--quick", f"--workdir={other}", f"--data_dir={data_dir}", ok=False)
  assert p.returncode != 0 and "different plan" in p.stderr


@pytest.mark.parametrize("corruption", ["drop_arm", "nan_loss", "x_not_increasing", "empty"])
def test_results_csv_check_rejects_bad_tables(upcycling_quick, tmp_path, corruption):
  """The CSV check above can fail: it rejects each kind of broken table."""
  workdir, _ = upcycling_quick
  rows = csv_rows(os.path.join(workdir, "upcycling.csv"))
  fields = list(rows[0])
  if corruption == "drop_arm":
    rows = [r for r in rows if r["arm"] != "moe_scratch"]
  elif corruption == "nan_loss":
    rows[-1]["loss"] = "nan"
  elif corruption == "x_not_increasing":
    i = max(i for i, r in enumerate(rows) if r["arm"] == "upcycled" and r["domain"] == "mean")
    rows[i]["x"] = "0"
  else:
    rows = []
  bad = tmp_path / "bad.csv"
  with open(bad, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  with pytest.raises(AssertionError):
    check_results_csv(bad, UPCYCLING_ARMS, SEEDS)


def test_png_check_rejects_non_png(upcycling_quick, tmp_path):
  workdir, _ = upcycling_quick
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "csv.png").write_bytes(open(os.path.join(workdir, "upcycling.csv"), "rb").read())
  shutil.copy(os.path.join(workdir, "upcycling.png"), tmp_path / "good.png")
  check_png(tmp_path / "good.png", FIGURE_SIZE)
  for name in ("empty.png", "csv.png"):
    with pytest.raises(AssertionError):
      check_png(tmp_path / name, FIGURE_SIZE)


# ---------------------------------------------------------------- the continual frontier

def test_continual_quick_writes_the_frontier(tmp_path, data_dir):
  from experiments.continual import figure as continual
  workdir = str(tmp_path / "continual")
  p = run_module("experiments.continual.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--seeds=0,1")
  arms = set(continual.QUICK_ARMS)
  check_results_csv(os.path.join(workdir, "continual.csv"), arms, SEEDS)
  check_png(os.path.join(workdir, "frontier.png"), FIGURE_SIZE)
  rows = csv_rows(os.path.join(workdir, "frontier.csv"))
  assert {(r["arm"], int(r["seed"])) for r in rows} == {(a, s) for a in arms for s in SEEDS}
  base = harness.read_evals(os.path.join(workdir, "base", "seed0"))[continual.SIZES["quick"]["base_steps"]]
  for r in rows:
    ev = harness.read_evals(os.path.join(workdir, r["arm"], f"seed{r['seed']}"))
    last = ev[max(ev)]
    assert float(r["python_loss"]) == pytest.approx(last["python_stdlib"])
    if r["seed"] == "0":  # forgetting is measured against base's checkpoint of the same seed
      assert float(r["forgetting"]) == pytest.approx(last["shakespeare_plays"] - base["shakespeare_plays"])
    drift = float(r["drift"])
    assert (0 <= drift <= 1) if r["arm"] == "grow_freeze_distill" else math.isnan(drift)
  with open(os.path.join(workdir, "frontier_summary.md")) as f:
    text = f.read()
  assert all(f"| {a} | 2 |" in text for a in arms) and " ± " in text
  assert "EWC (high lambda) forgets less" in open(os.path.join(workdir, "summary.md")).read()
  assert "frontier" in p.stdout


# ---------------------------------------------------------------- the merging figure

def _summary_value(text, label):
  line = next(l for l in text.splitlines() if l.startswith(f"| {label} |"))
  return float(line.split("|")[3].split("±")[0])


def test_merging_quick_merges_and_its_numbers_follow_from_the_csv(tmp_path, data_dir):
  from experiments.merging import figure as merging
  workdir = str(tmp_path / "merging")
  run_module("experiments.merging.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}", "--seeds=0,1")
  check_png(os.path.join(workdir, "merging_merges.png"), FIGURE_SIZE)
  rows = harness.read_csv_rows(os.path.join(workdir, "merging_points.csv"))
  at = lambda seed, panel, method, x=None, dom="mean": [
      r["loss"] for r in rows if r["seed"] == seed and r["panel"] == panel and r["method"] == method
      and r["domain"] == dom and (x is None or abs(r["x"] - x) < 1e-9)]
  text = open(os.path.join(workdir, "merging_summary.md")).read()
  for pair in ("one base", "different inits"):
    # the loss barrier by its definition (Frankle et al. 2020), recomputed here from the CSV
    barriers = []
    for seed in SEEDS:
      pts = sorted((r["x"], r["loss"]) for r in rows if r["seed"] == seed and r["panel"] == "interpolation"
                   and r["method"] == pair and r["domain"] == "mean")
      l0, l1 = pts[0][1], pts[-1][1]
      barriers.append(max(l - ((1 - a) * l0 + a * l1) for a, l in pts))
    assert _summary_value(text, f"loss barrier, {pair}") == pytest.approx(sum(barriers) / 2, abs=1e-4)
  for seed in SEEDS:
    # the interpolation's end point is ft_0 itself: its loss equals ft_0's own final evaluation
    ev = harness.read_evals(os.path.join(workdir, "ft_0", f"seed{seed}"))
    assert at(seed, "interpolation", "one base", 0.0, "python_stdlib")[0] == pytest.approx(
        ev[max(ev)]["python_stdlib"], rel=1e-5)
    # the greedy soup is never worse than its best ingredient on the held-out set
    best = min(at(seed, "soup", f"ft_{k}")[0] for k in range(merging.SIZES["quick"]["ingredients"]))
    assert at(seed, "soup", "greedy soup")[0] <= best + 1e-6
    for method in merging.TASK_METHODS:
      assert at(seed, "task", method) and all(math.isfinite(v) for v in at(seed, "task", method))
  assert "different inits have a higher loss barrier" in text and " ± " in text


# ---------------------------------------------------------------- the BTX figure

def test_btx_quick_trains_every_arm_and_measures_routing(tmp_path, data_dir):
  from experiments.btx import figure as btx
  workdir = str(tmp_path / "btx")
  run_module("experiments.btx.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}", "--seeds=0,1")
  arms = set(btx.QUICK_ARMS) - {"seed"}
  rows = check_results_csv(os.path.join(workdir, "btx.csv"), arms, SEEDS)
  check_png(os.path.join(workdir, "btx.png"), FIGURE_SIZE)
  check_png(os.path.join(workdir, "btx_routing.png"), FIGURE_SIZE)
  # matched training tokens after the seed: every arm ends at (nearly) the same FLOPs
  ends = {a: max(float(r["x"]) for r in rows if r["arm"] == a) for a in ("dense", "btx", "btm")}
  assert max(ends.values()) / min(ends.values()) < 1.01, ends
  # the mix is the BTX run's step 0: branch e's MLP is expert e (checked in tests/test_btx_run.py);
  # its certificate is the curve's first point
  import json
  with open(os.path.join(workdir, "btx", "seed0", "btx.json")) as f:
    cert = json.load(f)
  first = [r for r in rows if r["arm"] == "btx" and r["seed"] == "0" and r["step"] == "0"]
  assert {r["domain"]: float(r["loss"]) for r in first if r["domain"] != "mean"} == pytest.approx(cert["losses"]["mix"])
  routing = harness.read_csv_rows(os.path.join(workdir, "btx_routing.csv"))
  groups = {}
  for r in routing:
    groups.setdefault((r["arm"], r["seed"], r["when"], r["layer"], r["domain"]), []).append(r["fraction"])
  assert {k[2] for k in groups} == {"mix", "end"}
  assert all(abs(sum(v) - 1) < 1e-6 and len(v) == 2 for v in groups.values())
  text = open(os.path.join(workdir, "summary.md")).read()
  assert "BTX beats dense continuation" in text and "Shakespeare -> expert 0" in text
