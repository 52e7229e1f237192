"""A figure's pod-scale arms compiled ahead of time for a TPU slice (experiments/pod.py, the real TPU
compiler, no TPU): every arm's programs, each distinct program compiled once, the hours estimate
as steps times the roofline step time. The upcycling figure's pod size, with its model shrunk so
that the compiles take seconds, for a 16-chip slice."""
import dataclasses
import json
import os

import pytest

from experiments import pod
from experiments.upcycling import figure as upcycling

pytestmark = pytest.mark.slow  # slow tier: ahead-of-time TPU compiles


def shrunk(config):
  config.model.update(d_model=128, num_layers=2, num_heads=2, d_ff=256, scan_layers=False)
  config.data.seq_len = 128
  config.train.update(batch_size=32, eval_batch_size=16)
  config.mesh.update(data=-1, fsdp=4, expert=4)  # 16 chips
  return config


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  fig = upcycling.figure("pod")
  fig = dataclasses.replace(fig, arms=tuple(
      dataclasses.replace(a, config=lambda seed, make=a.config: shrunk(make(seed))) for a in fig.arms))
  root = str(tmp_path_factory.mktemp("pod"))
  assert pod.report(fig, "v5e-16", root) == 0
  with open(os.path.join(root, "aot.json")) as f:
    return fig, root, json.load(f)["rows"]


def test_every_arm_fits_and_each_distinct_program_compiles_once(compiled):
  fig, root, rows = compiled
  arms = {r["arm"]: r for r in rows if r.get("kind") == "arm"}
  assert set(arms) == {a.name for a in fig.arms} and all(a["fits"] and a["slice"] == "v5e-16" for a in arms.values())
  programs = [r for r in rows if r.get("kind") != "arm"]
  by_arm = {a: [r["program"] for r in programs if r["arm"] == a] for a in arms}
  assert by_arm["upcycled"] == ["stage0/train_step", "stage0/eval_step", "stage1/growth", "stage1/train_step",
                                "stage1/eval_step"]
  assert by_arm["dense"] == by_arm["dense_base"] == by_arm["moe_scratch"] == ["stage0/train_step", "stage0/eval_step"]
  # dense = dense_base's config; the upcycled run starts as the same dense model; the scratch MoE
  # is the upcycled model with another schedule: 2 + 1 (the growth) + 2 programs in all
  compiled_here = {a: [r["program"] for r in programs if r["arm"] == a and not r.get("same_as")] for a in arms}
  assert compiled_here == {"dense_base": ["stage0/train_step", "stage0/eval_step"], "dense": [],
                           "upcycled": ["stage1/growth", "stage1/train_step", "stage1/eval_step"], "moe_scratch": []}
  same = {(r["arm"], r["program"]): r["same_as"] for r in programs if r.get("same_as")}
  assert same[("moe_scratch", "stage0/train_step")] == "upcycled/stage1/train_step"
  assert same[("upcycled", "stage0/eval_step")] == "dense_base/stage0/eval_step"
  assert {a: arms[a]["compiled"] for a in arms} == {a: len(v) for a, v in compiled_here.items()}
  with open(os.path.join(root, "aot.md")) as f:
    text = f.read()
  assert "| upcycled | v5e-16 | yes |" in text and "ESTIMATES" in text


def test_hours_are_the_steps_times_the_estimated_step_time(compiled):
  fig, _, rows = compiled
  step_s = {(r["arm"], r["program"]): r["estimated_step_seconds"] for r in rows
            if r.get("kind") != "arm" and r["program"].endswith("train_step")}
  assert all(s > 0 for s in step_s.values())
  hours = {r["arm"]: r["estimated_hours"] for r in rows if r.get("kind") == "arm"}
  p = fig.plan
  n, m = p["dense_steps"], p["moe_steps"]
  dense_s, moe_s = step_s[("dense", "stage0/train_step")], step_s[("upcycled", "stage1/train_step")]
  assert moe_s > dense_s  # the MoE step does more work
  # each arm counts the steps it trains itself: dense and upcycled start from dense_base's step N
  assert hours["dense_base"] * 3600 == pytest.approx(n * dense_s, rel=1e-9)
  assert hours["dense"] * 3600 == pytest.approx(p["dense_extra_steps"] * dense_s, rel=1e-9)
  assert hours["upcycled"] * 3600 == pytest.approx(m * moe_s, rel=1e-9)
  assert hours["moe_scratch"] * 3600 == pytest.approx(p["scratch_steps"] * moe_s, rel=1e-9)
