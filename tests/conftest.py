"""Test session set-up: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""
import getpass
import os
import tempfile

# LLVM at -O0 unless XLA_FLAGS sets a level: the suite's programs are tiny, so compiling them
# dominates; measured 119 s -> 82 s of CPU for `experiments.preserving.run --quick` (cold cache).
_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Both real corpora built once per test session (shared by every test that trains)."""
  from moegrow import data
  d = str(tmp_path_factory.mktemp("tfds"))
  for name in data.LOCAL_DATASETS:
    data.build(name, d)
  return d
