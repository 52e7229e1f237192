"""Train (and grow at stage boundaries) from a config: the main entry point.

  python -m moegrow.main --config=configs/lm.py:small --workdir=runs/small [--config.train.steps=100]

Configs are named by path (`configs/grow.py:small`) or, from an installed copy, by package
(`--config=$(python -c "import moegrow.configs.grow as m; print(m.__file__)"):small`).
Many hosts: `--config.distributed.enabled=True` (TPU/GPU pods: jax discovers the cluster), or
name it, e.g. two CPU processes on loopback (run once per process_id, XLA_FLAGS giving each
process its devices): `--config.distributed.coordinator_address=127.0.0.1:1234
--config.distributed.num_processes=2 --config.distributed.process_id=0`.
"""
import json

from absl import app, flags, logging
from ml_collections import config_flags

import jax

from moegrow.cli import run_command
from moegrow.distributed import init_distributed
from moegrow.orchestrate import stages
from moegrow.train import plot

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, figures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  run_command(lambda: train(FLAGS.config, FLAGS.workdir))


def train(config, workdir: str) -> None:
  init_distributed(config)  # before anything touches a jax backend
  result = stages.train_and_evaluate(config, workdir)
  final = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  print(f"final metrics (process {jax.process_index()} of {jax.process_count()}): "
        f"{json.dumps(final, sort_keys=True)}", flush=True)
  if result.get("preempted"):
    print("preempted: checkpoint saved, run the same command to resume", flush=True)
  elif jax.process_index() == 0:
    print(f"loss curves: {plot.plot_run(workdir)}", flush=True)


if __name__ == "__main__":
  app.run(main)
