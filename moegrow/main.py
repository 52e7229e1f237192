"""moegrow entry point.

  python -m moegrow.main --config=configs/lm.py:small --workdir=runs/small [--config.train.steps=100]

Many hosts: `--config.distributed.enabled=True` (TPU/GPU pods: jax discovers the cluster), or
name it, e.g. two CPU processes on loopback (run once per process_id, XLA_FLAGS giving each
process its devices): `--config.distributed.coordinator_address=127.0.0.1:1234
--config.distributed.num_processes=2 --config.distributed.process_id=0`.
"""
import json

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def init_distributed(config) -> None:
  """Start this process of a multi-process job from `config.distributed`: False (one process),
  True (jax discovers the cluster), or a dict of `jax.distributed.initialize` arguments
  (coordinator_address, num_processes, process_id, local_device_ids; unset: "", 0, -1, "") plus
  `enabled` (default True; a coordinator_address alone also enables it). Call it before
  anything touches a jax backend."""
  import jax
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
  if _cpu_only(jax):  # cross-process collectives on CPU need gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in kw.items() if v is not None})


def _cpu_only(jax) -> bool:
  """True when jax will run on CPU: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
  import importlib.metadata
  import importlib.util
  if jax.config.jax_platforms:
    return jax.config.jax_platforms.split(",")[0].strip() == "cpu"
  return not (importlib.metadata.entry_points(group="jax_plugins") or importlib.util.find_spec("jax_plugins")
              or importlib.util.find_spec("libtpu"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  import jax  # after flag parsing: XLA flags may come from the environment
  config, workdir = FLAGS.config, FLAGS.workdir
  init_distributed(config)
  from moegrow import train
  result = train.train_and_evaluate(config, workdir)
  final = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  print(f"final metrics (process {jax.process_index()} of {jax.process_count()}): "
        f"{json.dumps(final, sort_keys=True)}", flush=True)
  if result.get("preempted"):
    print("preempted: checkpoint saved, run the same command to resume", flush=True)
  elif jax.process_index() == 0:
    from moegrow import plot
    print(f"loss curves: {plot.plot_run(workdir)}", flush=True)


if __name__ == "__main__":  # flags defined here: `init_distributed` is importable by other CLIs
  config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, figures.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
