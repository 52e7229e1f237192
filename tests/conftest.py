"""Test session set-up: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""
import getpass
import os
import shutil
import tempfile

# LLVM at -O0 unless XLA_FLAGS sets a level: the suite's programs are tiny, so compiling them
# dominates; measured 119 s -> 82 s of CPU for `experiments.preserving.run --quick` (cold cache).
# XLA's CPU fusion emitters off (its elemental emitters instead): they compile the same programs
# in about a third less time; measured 104 s -> 67 s for tests/test_attention.py + test_grow.py
# (cold cache, one process). Tests compare runs under the same flags, never against numbers
# computed with other ones.
_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
if "--xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
# libtpu is installed with the test extra (ahead-of-time TPU compiles, moegrow.aot): keep jax's
# runtime on the CPU, and let every xdist worker load the TPU compiler (each load takes a lock).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One persistent XLA compilation cache for the session, shared by the xdist workers and the
# subprocesses they start (the figures' --quick runs compile the same programs for every seed and
# arm): measured 304 s -> 164 s for `experiments.continual.run --quick`. Keyed by the program, the
# jax version and the flags, so a stale directory is harmless.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"moegrow-test-xla-cache-{getpass.getuser()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


def built_once(tmp_path_factory, name: str, build) -> str:
  """A directory that `build(path)` fills once per test session, shared by every xdist worker (the
  first worker to ask builds it under a file lock; the others wait, then reuse it). Read-only for
  tests: copy it before writing."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's directory, above the workers' own
  path = os.path.join(str(root), f"built-once-{name}")
  from moegrow.data.corpora import file_lock
  with file_lock(path + ".lock"):
    if not os.path.exists(os.path.join(path, ".complete")):
      shutil.rmtree(path, ignore_errors=True)  # a build that failed part-way
      os.makedirs(path)
      build(path)
      open(os.path.join(path, ".complete"), "w").close()
  return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Both real corpora, built once per test session for every worker (shared by every test that
  trains; nothing writes into it)."""
  from moegrow import data

  def build(d):
    for name in data.LOCAL_DATASETS:
      data.build(name, d)
  return built_once(tmp_path_factory, "tfds", build)


def pytest_collection_modifyitems(config, items):
  """Slow-tier tests first (a stable sort). With `--dist loadfile` (pyproject.toml) xdist hands
  whole files to the workers in this order, so the long files start first and the short ones fill
  in at the end, instead of one long file starting last."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


TINY_RUN = dict(steps=4, eval_every=0, checkpoint_every=4)  # the shared runs' train settings


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
  """Finished tiny dense runs (configs/lm.py:tiny on one device with TINY_RUN: 4 steps, one
  checkpoint at step 4), seeds 0 and 1, trained once per test session for every worker.
  `tiny_run(seed, dest)` copies seed's workdir to `dest` and returns it: tests get their own copy."""
  from _tiny import train_config

  def build(root):
    from moegrow.orchestrate import stages
    for seed in (0, 1):
      stages.train_and_evaluate(train_config(data_dir, seed=seed, **TINY_RUN), os.path.join(root, f"seed{seed}"))
  root = built_once(tmp_path_factory, "tiny-runs", build)

  def copy(seed: int, dest) -> str:
    shutil.copytree(os.path.join(root, f"seed{seed}"), dest)
    return str(dest)
  return copy
