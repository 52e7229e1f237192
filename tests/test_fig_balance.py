"""The balance figure (experiments/balance) in its --quick mode on the real corpora, in process
with one seed: both arms' curves, the load table recomputed from metrics.jsonl by a plain loop, and
the loss-free arm's bias in its checkpoint."""
import os

import numpy as np
import pytest

from experiments import harness
from experiments.balance import figure as balance
from _figures import check_results_csv
from _tiny import FIGURE_SIZE, check_png, csv_rows, read_metrics

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("balance"))
  assert harness.run(balance.figure, ["--quick", "--seeds=0", f"--workdir={workdir}", f"--data_dir={data_dir}"]) == 0
  return workdir


def test_both_arms_train_and_the_load_table_follows_from_the_logs(quick):
  check_results_csv(os.path.join(quick, "balance.csv"), {"aux16", "free16", "fast16"}, (0,))
  for png in ("balance.png", "load.png"):
    check_png(os.path.join(quick, png), FIGURE_SIZE)
  t = balance.SIZES["quick"]["steps"]
  for r in csv_rows(os.path.join(quick, "load.csv")):
    ratios = {}
    for m in read_metrics(os.path.join(quick, r["arm"], "seed0")):
      loads = [m[f"moe/1/load/{e}"] for e in range(16) if f"moe/1/load/{e}" in m]
      if len(loads) == 16:
        ratios[m["step"]] = max(loads) / (sum(loads) / 16)
    assert float(r["max_over_mean_final"]) == pytest.approx(ratios[t])
    assert float(r["max_over_mean_late"]) == pytest.approx(np.mean([v for s, v in ratios.items() if s > t // 2]))
  assert "| free16 | 1 |" in open(os.path.join(quick, "load_summary.md")).read()


def test_the_load_plot_draws_each_arms_logged_load(quick, tmp_path):
  drawn = balance.plot_load(str(tmp_path / "load.png"), balance.figure(True), quick, (0,))
  assert [d.series for d in drawn] == ["aux16", "free16", "fast16"]
  for d in drawn:
    ratios = {}
    for m in read_metrics(os.path.join(quick, d.series, "seed0")):
      loads = [m[f"moe/1/load/{e}"] for e in range(16) if f"moe/1/load/{e}" in m]
      if len(loads) == 16 and "loss" in m:
        ratios[m["step"]] = max(loads) / (sum(loads) / 16)
    assert d.x == sorted(ratios) and d.mean == pytest.approx([ratios[s] for s in sorted(ratios)], abs=1e-12)
    assert d.se == [0.0] * len(d.x)  # one seed: no band


def test_only_the_loss_free_arms_move_a_selection_bias(quick):
  from moegrow import checkpoint
  t = balance.SIZES["quick"]["steps"]
  for arm, has, rate in (("free16", True, balance.RATE), ("fast16", True, balance.FAST_RATE), ("aux16", False, 0)):
    src_dir, prefix, step = checkpoint.locate(os.path.join(quick, arm, "seed0"))
    mngr = checkpoint.manager(src_dir, read_only=True, step_prefix=prefix)
    try:
      import orbax.checkpoint as ocp
      state = mngr.restore(step, args=ocp.args.Composite(**{checkpoint.STATE: ocp.args.StandardRestore()}))
    finally:
      mngr.close()
    mlp = state[checkpoint.STATE]["params"]["blocks"]["1"]["mlp"]
    assert step == t and ("selection_bias_E" in mlp) == has
    if has:  # t steps of +-1e-3 (or 0) per expert
      b = np.asarray(mlp["selection_bias_E"])
      assert 0 < np.abs(b).max() <= t * rate + 1e-6
