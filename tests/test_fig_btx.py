"""The Branch-Train-MiX figure (experiments/btx) in its --quick mode on the real corpora: every arm
at matched FLOPs, the mix's certificate as the curve's first point, routing fractions."""
import json
import os

import pytest

from experiments import harness
from _figures import check_results_csv, run_module
from _tiny import FIGURE_SIZE, check_png

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run


def test_btx_quick_trains_every_arm_and_measures_routing(tmp_path, data_dir):
  from experiments.btx import figure as btx
  workdir = str(tmp_path / "btx")
  p = run_module("experiments.btx.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}", "--seeds=0")
  arms = set(btx.QUICK_ARMS) - {"seed"}
  rows = check_results_csv(os.path.join(workdir, "btx.csv"), arms, (0,))
  check_png(os.path.join(workdir, "btx.png"), FIGURE_SIZE)
  check_png(os.path.join(workdir, "btx_routing.png"), FIGURE_SIZE)
  # matched training tokens after the seed: every arm ends at (nearly) the same FLOPs
  ends = {a: max(float(r["x"]) for r in rows if r["arm"] == a) for a in ("dense", "btx", "btm")}
  assert max(ends.values()) / min(ends.values()) < 1.01, ends
  # the mix is the BTX run's step 0: branch e's MLP is expert e (checked in tests/test_btx_run.py);
  # its certificate is the curve's first point
  with open(os.path.join(workdir, "btx", "seed0", "btx.json")) as f:
    cert = json.load(f)
  first = [r for r in rows if r["arm"] == "btx" and r["seed"] == "0" and r["step"] == "0"]
  assert {r["domain"]: float(r["loss"]) for r in first if r["domain"] != "mean"} == pytest.approx(cert["losses"]["mix"])
  # btx_random's branches are btx's, copied and not trained again: its log names the copy, the
  # branches' logs are byte-identical (a retrained branch logs its own throughput) and its mix
  # certificate reports the same branch losses
  assert "[reuse]" in p.stdout
  for branch in ("shakespeare", "python"):
    logs = [open(os.path.join(workdir, a, "seed0", "branches", branch, "metrics.jsonl"), "rb").read()
            for a in ("btx", "btx_random")]
    assert logs[0] == logs[1] and logs[0]
  with open(os.path.join(workdir, "btx_random", "seed0", "btx.json")) as f:
    assert json.load(f)["losses"]["branch shakespeare"] == pytest.approx(cert["losses"]["branch shakespeare"], abs=0)
  routing = harness.read_csv_rows(os.path.join(workdir, "btx_routing.csv"))
  groups = {}
  for r in routing:
    groups.setdefault((r["arm"], r["seed"], r["when"], r["layer"], r["domain"]), []).append(r["fraction"])
  assert {k[2] for k in groups} == {"mix", "end"}
  assert all(abs(sum(v) - 1) < 1e-6 and len(v) == 2 for v in groups.values())
  text = open(os.path.join(workdir, "summary.md")).read()
  assert "BTX beats dense continuation" in text and "Shakespeare -> expert 0" in text
