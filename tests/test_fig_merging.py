"""The merging figure (experiments/merging) in its --quick mode on the real corpora: the loss
barrier recomputed from the CSV by its definition, soups and task vectors."""
import math
import os

import pytest

from experiments import harness
from _figures import SEEDS, run_module
from _tiny import FIGURE_SIZE, check_png

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run


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
    # on the selection batches, the greedy soup is never worse than the best ingredient, which is the
    # ingredient with the lowest selection loss (the reported batches may disagree: they are others)
    sel = {r["method"]: r for r in rows if r["seed"] == seed and r["panel"] == "greedy selection"}
    assert sel["greedy soup"]["loss"] <= sel["best ingredient"]["loss"] + 1e-6
    k = merging.best_ingredient(rows, seed)
    assert sel["best ingredient"]["x"] == k and 0 <= k < merging.SIZES["quick"]["ingredients"]
    for method in merging.TASK_METHODS:
      assert at(seed, "task", method) and all(math.isfinite(v) for v in at(seed, "task", method))
  assert "different inits have a higher loss barrier" in text and " ± " in text


def test_the_greedy_soup_selects_on_batches_it_is_never_reported_on(data_dir):
  from experiments.merging import figure as merging
  from moegrow.orchestrate import parts
  config = merging.base_config("quick")
  config.data.data_dir = data_dir
  s = dict(merging.SIZES["quick"], eval_batches=2, select_batches=3)
  report, select = merging.report_and_select_sets(config, s)
  config.train.eval_batches = 2
  curves = parts.eval_sets(config)  # what the training curves are evaluated on
  rows = lambda batches: [r.tobytes() for b in batches for r in b["inputs"]]
  for d in curves:
    assert rows(report[d]) == rows(curves[d])
    assert len(select[d]) == 3 and not set(rows(select[d])) & set(rows(report[d]))
  with pytest.raises(ValueError, match="fewer than"):
    merging.report_and_select_sets(config, dict(s, select_batches=10**6))
