"""The built wheel: it holds every subpackage and the configs, and an installed copy (not the
checkout) imports, loads its configs and trains from an unrelated working directory."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

from _tiny import read_metrics

pytestmark = pytest.mark.slow  # slow tier: builds and installs the wheel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ("moegrow.main", "moegrow.grow", "moegrow.merge", "moegrow.btx", "moegrow.hf.__main__")
SUBPACKAGES = ("moegrow", "moegrow/model", "moegrow/params", "moegrow/surgery", "moegrow/data", "moegrow/train",
               "moegrow/orchestrate", "moegrow/hf", "moegrow/configs")
# Not part of a source tree to build from: version control, environments, build and run outputs.
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                "runs", "workdir", "*.pyc")


def _run(cmd, timeout, **kw):
  return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)


def build_wheel(src: str, out: str) -> str:
  """`pip wheel` with the environment's own setuptools and wheel (the `test` extra): no network."""
  cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src]
  p = _run(cmd, timeout=300, cwd=out)
  wheels = glob.glob(os.path.join(out, "moegrow-*.whl"))
  assert p.returncode == 0 and wheels, f"could not build a wheel:\n$ {' '.join(cmd)}\n{p.stdout[-3000:]}"
  return wheels[0]


def module_name(path: str) -> str:
  name = path[:-len(".py")].replace("/", ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def child_env(site: str) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = site  # the installed copy comes before the editable install of the checkout
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=1").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("PYTHONSAFEPATH", None)
  return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("wheel")
  src = str(tmp / "src")
  shutil.copytree(REPO, src, ignore=IGNORE)  # a clean tree: no stale build/ or egg-info from the checkout
  out = tmp / "dist"
  out.mkdir()
  return build_wheel(src, str(out))


def test_wheel_contains_every_subpackage_and_the_configs(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  for pkg in SUBPACKAGES:
    assert f"{pkg}/__init__.py" in names, pkg
  assert {"moegrow/configs/lm.py", "moegrow/configs/grow.py"} <= names
  # Exactly the package's sources: every .py under moegrow/ and configs/ (as moegrow/configs/), nothing else.
  expected = set()
  for folder, prefix in (("moegrow", "moegrow"), ("configs", "moegrow/configs")):
    for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True):
      expected.add(prefix + "/" + os.path.relpath(path, os.path.join(REPO, folder)).replace(os.sep, "/"))
  shipped = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert shipped == expected, {"missing": sorted(expected - shipped), "extra": sorted(shipped - expected)}


def test_installed_copy_imports_and_trains_from_elsewhere(wheel, tmp_path, data_dir):
  site = str(tmp_path / "site")
  p = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, wheel], timeout=120)
  assert p.returncode == 0, p.stdout[-3000:]
  modules = sorted(module_name(n) for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py"))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = child_env(site)

  # (a) Configs import each other as package modules (no checkout, no current directory), then every
  # module imports, and every one of them comes from the installed copy.
  script = textwrap.dedent(f"""
      import importlib, json, sys
      site = {site!r}
      from moegrow.configs import grow
      assert "moegrow.configs.lm" in sys.modules
      c = grow.get_config("tiny")
      found = {{"grow_file": grow.__file__, "lm_file": sys.modules["moegrow.configs.lm"].__file__,
               "d_model": c.model.d_model, "stages": [s["name"] for s in c.stages], "steps": c.train.steps}}
      from absl import flags
      files = {{}}
      for name in {modules!r}:
        if name in {CLIS!r}:  # each CLI defines --config and --workdir: one CLI's flags at a time
          for flag in ("config", "workdir", "from", "stage", "to", "arch", "dtype", "max_shard_mb"):
            if flag in flags.FLAGS:
              delattr(flags.FLAGS, flag)
        files[name] = importlib.import_module(name).__file__
      found["files"] = files
      import jax, moegrow
      found["moegrow"] = moegrow.__file__
      found["devices"] = jax.device_count()
      print("RESULT " + json.dumps(found))
  """)
  p = _run([sys.executable, "-c", script], timeout=120, cwd=str(elsewhere), env=env)
  assert p.returncode == 0, p.stdout[-5000:]
  found = json.loads(p.stdout.split("RESULT ", 1)[1])
  assert found["moegrow"] == os.path.join(site, "moegrow", "__init__.py")
  assert found["devices"] == 1
  assert found["grow_file"] == os.path.join(site, "moegrow", "configs", "grow.py")
  assert found["lm_file"] == os.path.join(site, "moegrow", "configs", "lm.py")
  assert found["d_model"] == 64 and found["stages"] == ["dense", "moe8"] and found["steps"] == 200
  assert sorted(found["files"]) == modules and len(modules) >= 30
  outside = {m: f for m, f in found["files"].items() if not f.startswith(site + os.sep)}
  assert not outside, outside

  # (b) The training CLI with the installed config file.
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "moegrow.main", f"--config={site}/moegrow/configs/lm.py:tiny", f"--workdir={work}",
         "--config.train.steps=2", "--config.train.eval_every=0", "--config.train.checkpoint_every=2",
         "--config.train.log_every=1", f"--config.data.data_dir={data_dir}"]
  p = _run(cmd, timeout=180, cwd=str(elsewhere), env=env)
  assert p.returncode == 0, p.stdout[-5000:]
  assert os.path.isdir(work / "checkpoints" / "2" / "state"), os.listdir(work / "checkpoints")
  rows = read_metrics(work)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert all(r["loss"] > 0 for r in rows if "loss" in r)
  assert "process 0 of 1" in p.stdout  # one device, one process
