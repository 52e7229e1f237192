"""The continual-learning figure (experiments/continual) in its --quick mode on the real corpora:
the frontier's numbers follow from the runs' evaluations."""
import math
import os

import pytest

from experiments import harness
from _figures import SEEDS, check_results_csv, run_module
from _tiny import FIGURE_SIZE, check_png, csv_rows

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run


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
