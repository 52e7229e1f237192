"""Multi-process start-up for the CLIs (TPU/GPU pods, or CPU processes on loopback)."""
from __future__ import annotations

import importlib.metadata
import importlib.util

import jax


def init_distributed(config) -> None:
  """Start this process of a multi-process job from `config.distributed`: False (one process),
  True (jax discovers the cluster), or a dict of `jax.distributed.initialize` arguments
  (coordinator_address, num_processes, process_id, local_device_ids; unset: "", 0, -1, "") plus
  `enabled` (default True; a coordinator_address alone also enables it). Call it before
  anything touches a jax backend."""
  d = config.get("distributed", False)
  if not isinstance(d, bool):
    d = dict(d)
    if not (d.pop("enabled", True) or d.get("coordinator_address")):
      return
    ids = d.get("local_device_ids")
    if isinstance(ids, str):  # "0,1" from the command line
      ids = [int(i) for i in ids.split(",") if i.strip()] or None
    pid = d.get("process_id")
    kw = {"coordinator_address": d.get("coordinator_address") or None, "local_device_ids": ids,
          "num_processes": d.get("num_processes") or None, "process_id": None if pid is None or pid < 0 else pid}
  elif d:
    kw = {}
  else:
    return
  if _cpu_only():  # cross-process collectives on CPU need gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in kw.items() if v is not None})


def _cpu_only() -> bool:
  """True when jax will run on CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
  if jax.config.jax_platforms:
    return jax.config.jax_platforms.split(",")[0].strip() == "cpu"
  return not (importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("jax_plugins")
              or importlib.util.find_spec("libtpu"))
