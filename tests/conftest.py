"""Test session set-up: 8 simulated CPU devices (set before jax is imported) and shared fixtures."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Both real corpora built once per test session (shared by every test that trains)."""
  from moegrow import data
  d = str(tmp_path_factory.mktemp("tfds"))
  for name in data.LOCAL_DATASETS:
    data.build(name, d)
  return d
