"""The upcycling figure (experiments/upcycling) in its --quick mode on the real corpora: outputs,
the summary's numbers, resuming and skipping finished runs, a different plan refused."""
import csv
import os
import shutil

import pytest

from experiments import harness
from experiments.upcycling import figure as upcycling
from _figures import SEEDS, check_results_csv, run_module
from _tiny import FIGURE_SIZE, check_png, csv_rows

pytestmark = pytest.mark.slow  # slow tier: a figure's --quick run

UPCYCLING_ARMS = {"dense", "upcycled", "moe_scratch"}


@pytest.fixture(scope="module")
def upcycling_quick(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("upcycling"))
  p = run_module("experiments.upcycling.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}",
                 "--seeds=" + ",".join(map(str, SEEDS)))
  return workdir, p.stdout


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
  at_end, _, at_flops = summary.partition("at equal training FLOPs")
  assert at_end.count("| upcycling beats") == 2 and " ± " in summary
  # The summary's numbers are the CSV's: recompute the claims from the written table, at the end
  # and (where the arms end at different FLOPs) at equal FLOPs.
  rows = harness.read_csv(os.path.join(workdir, "upcycling.csv"))
  fig = upcycling.figure(True)
  _, claims = harness.summarize(rows, fig.claims)
  written = csv_rows(os.path.join(workdir, "summary.csv"))
  assert [float(r["effect"]) for r in written if r["kind"] == "claim"] == pytest.approx(
      [c["effect"] for c in claims], abs=1e-12)
  flops = [c for c in harness.claims_at_equal_flops(rows, fig.claims) if c["differs"]]
  assert [float(r["effect"]) for r in written if r["kind"] == "claim_at_equal_flops"] == pytest.approx(
      [c["effect"] for c in flops], abs=1e-12)
  assert at_flops.count("| upcycling beats") == len(flops)


def in_process(capsys, *args) -> tuple[int, str]:
  """The figure's command line run in this process (the fixture ran it in a fresh one): the exit
  status and what it printed. The compiled steps of earlier runs in this process are reused."""
  capsys.readouterr()
  code = harness.run(upcycling.figure, ["--quick", *args])
  return code, capsys.readouterr().out


def test_upcycling_rerun_skips_finished_runs(upcycling_quick, data_dir, capsys):
  workdir, _ = upcycling_quick
  runs = [os.path.join(workdir, a, f"seed{s}", "metrics.jsonl") for a in UPCYCLING_ARMS for s in SEEDS]
  sizes = {r: os.path.getsize(r) for r in runs}
  code, out = in_process(capsys, f"--workdir={workdir}", f"--data_dir={data_dir}",
                         "--seeds=" + ",".join(map(str, SEEDS)))
  assert code == 0 and out.count("finished earlier; skipping") == 4 * len(SEEDS), out
  assert sizes == {r: os.path.getsize(r) for r in runs}


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, data_dir, capsys):
  workdir = str(tmp_path / "sweep")
  code, first = in_process(capsys, f"--workdir={workdir}", f"--data_dir={data_dir}", "--seeds=0",
                           "--stop_after_steps=4")
  assert code == 1 and "stopped before its end" in first, first[-2000:]
  assert not os.path.exists(os.path.join(workdir, "dense_base", "seed0", "done.json"))
  code, second = in_process(capsys, f"--workdir={workdir}", f"--data_dir={data_dir}", "--seeds=0")
  assert code == 0 and "resumed from" in second and "at step 4" in second, second[-2000:]
  assert all(os.path.exists(os.path.join(workdir, a, "seed0", "done.json")) for a in ("dense_base", *UPCYCLING_ARMS))
  check_results_csv(os.path.join(workdir, "upcycling.csv"), UPCYCLING_ARMS, (0,))


def test_a_different_plan_is_refused(upcycling_quick, data_dir, tmp_path):
  workdir, _ = upcycling_quick
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  with open(os.path.join(other, "plan.json"), "w") as f:
    f.write('{"size": "small"}')
  with pytest.raises(ValueError, match="different plan"):
    harness.run(upcycling.figure, ["--quick", f"--workdir={other}", f"--data_dir={data_dir}"])


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
