"""The shrink figure (experiments/shrink) in its --quick mode on the real corpora, in process with
one seed: every arm's curve, the cut table recomputed from the runs' own evaluations, what each
boundary measured, and the distilled arm's teacher."""
import json
import os

import numpy as np
import pytest

from experiments import harness
from experiments.shrink import figure as shrink
from _figures import check_results_csv
from _tiny import FIGURE_SIZE, check_png, csv_rows, read_metrics

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run

SEEDS = (0,)
ARMS = {"e8", "e4", *shrink.CUTS}


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("shrink"))
  assert harness.run(shrink.figure, ["--quick", "--seeds=0", f"--workdir={workdir}", f"--data_dir={data_dir}"]) == 0
  return workdir


def test_every_arm_trains_and_the_cut_table_follows_from_the_runs(quick):
  rows = check_results_csv(os.path.join(quick, "shrink.csv"), ARMS, SEEDS)
  for png in ("shrink.png", "cut.png"):
    check_png(os.path.join(quick, png), FIGURE_SIZE)
  s = shrink.SIZES["quick"]
  n, t = s["pre"], s["pre"] + s["post"]
  at = lambda arm, step: next(float(r["loss"]) for r in rows if r["arm"] == arm and int(r["step"]) == step
                              and r["domain"] == "mean")
  cut = csv_rows(os.path.join(quick, "cut.csv"))
  assert {r["arm"] for r in cut} == set(shrink.CUTS)
  for r in cut:
    assert float(r["L_before"]) == pytest.approx(at("e8", n))
    assert float(r["L_final"]) == pytest.approx(at(r["arm"], t))
    assert float(r["L_e8"]) == pytest.approx(at("e8", t)) and float(r["L_e4"]) == pytest.approx(at("e4", t))
    with open(os.path.join(quick, r["arm"], "seed0", "cut_eval.json")) as f:
      assert float(r["L_cut"]) == pytest.approx(np.mean(list(json.load(f).values())))
    assert float(r["L_cut"]) != pytest.approx(float(r["L_before"]))  # a cut that changes nothing is no cut
  summary = open(os.path.join(quick, "cut_summary.md")).read()
  for r in cut:  # one seed: the table's cells are that seed's differences
    assert f"| {r['arm']} | 1 | {float(r['L_cut']) - float(r['L_before']):+.4f} |" in summary


def test_each_boundary_measured_what_its_op_needs(quick):
  n = shrink.SIZES["quick"]["pre"]
  ops = {}
  for arm in shrink.CUTS:
    with open(os.path.join(quick, arm, "seed0", "growth", f"{n}.json")) as f:
      (ops[arm],) = json.load(f)["ops"]
  assert len(ops["prune_frequency"]["scores"]["1"]) == 8 and len(ops["prune_reap"]["scores"]["1"]) == 8
  assert ops["prune_frequency"]["scores"] != ops["prune_reap"]["scores"]
  assert np.shape(ops["merge_output"]["features"]["1"])[0] == 8 and "perms" not in ops["merge_output"]
  assert np.shape(ops["merge_output_aligned"]["perms"]["1"]) == (8, 256)
  kl = [r["distill_kl"] for r in read_metrics(os.path.join(quick, "prune_reap_distill", "seed0")) if "distill_kl" in r]
  assert kl and all(np.isfinite(kl)) and max(kl) > 0
  assert not any("distill_kl" in r for r in read_metrics(os.path.join(quick, "prune_reap", "seed0")))
