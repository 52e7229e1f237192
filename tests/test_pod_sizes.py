"""Every figure's `pod` size, checked without compiling (fast tier; tests/test_pod.py compiles one):
each run of each arm is a valid config for the slice the size names, and trains and evaluates on
the pod's TFDS datasets only, never on the local corpora."""
import importlib
import os

import pytest

from experiments import harness, pod
from moegrow import aot
from moegrow.orchestrate.validate import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = sorted(d for d in os.listdir(os.path.join(REPO, "experiments"))
                 if os.path.exists(os.path.join(REPO, "experiments", d, "figure.py")))
LOCAL = ("shakespeare_plays", "python_stdlib")


def mixtures(config) -> list[dict]:
  """Every data mixture a run config names: its own, its stages', a BTX config's branches'."""
  out = [dict(config.data.mixture)]
  out += [dict(s["mixture"]) for s in (config.get("stages", None) or ()) if s.get("mixture")]
  if "btx" in config:
    out += [dict(b["mixture"]) for b in config.btx.branches]
  return out


def test_every_figure_has_a_pod_size():
  assert FIGURES and all("pod" in importlib.import_module(f"experiments.{f}.figure").SIZES for f in FIGURES)


@pytest.mark.parametrize("name", FIGURES)
def test_pod_arms_are_valid_for_their_slice_and_read_only_pod_datasets(name):
  module = importlib.import_module(f"experiments.{name}.figure")
  fig = module.figure("pod")
  sl = aot.parse_topology(module.SIZES["pod"].get("topology", "v5e-64"))
  assert fig.plan["size"] == "pod" and fig.arms
  for arm in fig.arms:
    for label, config in pod.run_configs(harness.arm_config(fig, arm, 0, data_dir="")):
      where = f"{name}/{arm.name} {label}"
      validate_config(config, num_devices=sl.chips, process_count=sl.chips // 4)
      assert config.data.seq_len == 2048 and config.train.batch_size == 512, where
      for mix in mixtures(config):
        assert mix and not set(mix) & set(LOCAL), (where, mix)
        assert set(mix) <= {pod.ENGLISH, pod.CODE}, (where, mix)


def test_an_arm_is_not_charged_for_branches_it_reuses():
  """BTX at pod: btx trains its branches, btx_random copies them (Arm.reuse) and trains only its
  mixed MoE; the hours of experiments/pod.py count what each arm trains itself."""
  btx = importlib.import_module("experiments.btx.figure").figure("pod")
  arms = {a.name: a for a in btx.arms}
  for name, expected in (("btx", [True, True, True]), ("btx_random", [False, False, True])):
    labels = [label for label, _ in pod.run_configs(harness.arm_config(btx, arms[name], 0, data_dir=""))]
    assert labels == ["branch shakespeare/", "branch python/", "mix/"]
    assert [pod.trains_itself(arms[name], label) for label in labels] == expected, name


@pytest.mark.parametrize("name", FIGURES)
def test_each_pod_arm_is_its_config_files_arm(name):
  """The launch commands' `experiments/<figure>/config.py:pod,<arm>` is the figure's pod arm."""
  figure = importlib.import_module(f"experiments.{name}.figure")
  config = importlib.import_module(f"experiments.{name}.config")
  fig = figure.figure("pod")
  for arm in fig.arms:
    assert config.get_config(f"pod,{arm.name}").to_dict() == arm.config(0).to_dict(), (name, arm.name)
