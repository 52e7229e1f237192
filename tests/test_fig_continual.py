"""The continual-learning figure (experiments/continual) in its --quick mode on the real corpora, in
process with one seed (the mean ± SE over seeds is checked on the committed 3-seed results in
tests/test_figure_plots.py): the frontier's numbers follow from the runs' evaluations."""
import math
import os

import pytest

from experiments import harness
from _figures import check_results_csv
from _tiny import FIGURE_SIZE, check_png, csv_rows

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run


def test_continual_quick_writes_the_frontier(tmp_path, data_dir, capsys):
  from experiments.continual import figure as continual
  workdir = str(tmp_path / "continual")
  assert harness.run(continual.figure, ["--quick", f"--workdir={workdir}", f"--data_dir={data_dir}", "--seeds=0"]) == 0
  out = capsys.readouterr().out
  arms = set(continual.QUICK_ARMS)
  check_results_csv(os.path.join(workdir, "continual.csv"), arms, (0,))
  check_png(os.path.join(workdir, "frontier.png"), FIGURE_SIZE)
  rows = csv_rows(os.path.join(workdir, "frontier.csv"))
  assert {(r["arm"], int(r["seed"])) for r in rows} == {(a, 0) for a in arms}
  base = harness.read_evals(os.path.join(workdir, "base", "seed0"))[continual.SIZES["quick"]["base_steps"]]
  with open(os.path.join(workdir, "frontier_summary.md")) as f:
    text = f.read()
  for r in rows:
    ev = harness.read_evals(os.path.join(workdir, r["arm"], f"seed{r['seed']}"))
    last = ev[max(ev)]
    assert float(r["python_loss"]) == pytest.approx(last["python_stdlib"])
    # forgetting is measured against base's checkpoint of the same seed
    assert float(r["forgetting"]) == pytest.approx(last["shakespeare_plays"] - base["shakespeare_plays"])
    drift = float(r["drift"])
    assert (0 <= drift <= 1) if r["arm"] == "grow_freeze_distill" else math.isnan(drift)
    # the summary's row is this run's numbers (one seed: the mean, no SE)
    line = next(l for l in text.splitlines() if l.startswith(f"| {r['arm']} | 1 |"))
    cells = [c.strip() for c in line.split("|")[3:6]]
    assert float(cells[0]) == pytest.approx(float(r["python_loss"]), abs=1e-4)
    assert float(cells[1]) == pytest.approx(float(r["forgetting"]), abs=1e-4)
    assert cells[2] == "n/a" if math.isnan(drift) else float(cells[2]) == pytest.approx(drift, abs=1e-4)
  assert "EWC (high lambda) forgets less" in open(os.path.join(workdir, "summary.md")).read()
  assert "frontier" in out
