"""The experiment scripts in experiments/ run end to end in their --quick mode on the real corpora."""
import csv
import math
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UPCYCLING_VARIANTS = {"dense", "upcycled", "moe_scratch"}


def run_module(module, *args, timeout=300):
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                     timeout=timeout)
  assert p.returncode == 0, f"{module} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
  return p.stdout


def check_upcycling_csv(path):
  """All three variants, finite losses, >= 2 points per (variant, domain), strictly increasing extra_flops."""
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert rows, f"{path} has no rows"
  variants = {r["variant"] for r in rows}
  assert variants == UPCYCLING_VARIANTS, f"variants {sorted(variants)} != {sorted(UPCYCLING_VARIANTS)}"
  bad = [r for r in rows if not math.isfinite(float(r["loss"]))]
  assert not bad, f"non-finite losses: {bad[:3]}"
  domains = {r["domain"] for r in rows}
  assert {"mean", "shakespeare_plays", "python_stdlib"} <= domains, f"domains {sorted(domains)}"
  for v in UPCYCLING_VARIANTS:
    for d in domains:
      xs = [float(r["extra_flops"]) for r in rows if r["variant"] == v and r["domain"] == d]
      assert len(xs) >= 2, f"{v}/{d}: {len(xs)} points"
      assert all(b > a for a, b in zip(xs, xs[1:])), f"{v}/{d}: extra_flops not increasing: {xs}"
  for v in ("dense", "upcycled"):  # both continuations start at the dense checkpoint
    assert min(float(r["extra_flops"]) for r in rows if r["variant"] == v) == 0.0, v
  return rows


def check_png(path):
  with open(path, "rb") as f:
    blob = f.read()
  assert blob[:8] == PNG_MAGIC, f"{path} is not a PNG"
  import matplotlib.image
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 400, f"{path}: image of shape {img.shape}"
  assert img[..., :3].std() > 0.01, f"{path} is blank"


@pytest.fixture(scope="module")
def upcycling_quick(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("upcycling"))
  out = run_module("experiments.upcycling.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}")
  return workdir, out


def test_upcycling_quick_writes_csv_and_png(upcycling_quick):
  workdir, out = upcycling_quick
  check_upcycling_csv(os.path.join(workdir, "upcycling.csv"))
  check_png(os.path.join(workdir, "upcycling.png"))
  assert "growth certificate" in out  # the upcycled run grew the shared dense checkpoint
  # The shared dense checkpoint is copied, never modified: dense_base still ends at its own step.
  assert sorted(os.listdir(os.path.join(workdir, "dense_base", "checkpoints"))) == ["6"]


def test_upcycling_rerun_skips_finished_runs(upcycling_quick, data_dir):
  workdir, _ = upcycling_quick
  sizes = {v: os.path.getsize(os.path.join(workdir, v, "metrics.jsonl")) for v in UPCYCLING_VARIANTS}
  out = run_module("experiments.upcycling.run", "--quick", f"--workdir={workdir}", f"--data_dir={data_dir}")
  assert out.count("skipping") == 4, out
  assert sizes == {v: os.path.getsize(os.path.join(workdir, v, "metrics.jsonl")) for v in UPCYCLING_VARIANTS}
  check_upcycling_csv(os.path.join(workdir, "upcycling.csv"))


@pytest.mark.parametrize("corruption", ["drop_variant", "nan_loss", "flops_not_increasing", "empty"])
def test_upcycling_csv_check_rejects_bad_tables(upcycling_quick, tmp_path, corruption):
  """The CSV check above can fail: it rejects each kind of broken table."""
  workdir, _ = upcycling_quick
  with open(os.path.join(workdir, "upcycling.csv")) as f:
    rows = list(csv.DictReader(f))
  fields = list(rows[0])
  if corruption == "drop_variant":
    rows = [r for r in rows if r["variant"] != "moe_scratch"]
  elif corruption == "nan_loss":
    rows[-1]["loss"] = "nan"
  elif corruption == "flops_not_increasing":
    i = max(i for i, r in enumerate(rows) if r["variant"] == "upcycled" and r["domain"] == "mean")
    rows[i]["extra_flops"] = "0"
  else:
    rows = []
  bad = tmp_path / "bad.csv"
  with open(bad, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  with pytest.raises(AssertionError):
    check_upcycling_csv(bad)


def test_png_check_rejects_non_png(upcycling_quick, tmp_path):
  workdir, _ = upcycling_quick
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "csv.png").write_bytes(open(os.path.join(workdir, "upcycling.csv"), "rb").read())
  shutil.copy(os.path.join(workdir, "upcycling.png"), tmp_path / "good.png")
  check_png(tmp_path / "good.png")
  for name in ("empty.png", "csv.png"):
    with pytest.raises(AssertionError):
      check_png(tmp_path / name)
