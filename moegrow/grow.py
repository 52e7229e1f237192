"""Grow a finished checkpoint offline into a stage of a config, then train on with moegrow.main.

  python -m moegrow.grow --from=<workdir | checkpoints dir | step dir> --config=<config of the grown run>
      --workdir=<new dir> [--stage=N]
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moegrow.cli import run_command
from moegrow.distributed import init_distributed
from moegrow.orchestrate import boundary, stages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config whose stage the checkpoint grows into.")
flags.DEFINE_string("from", None, "A run's workdir, its checkpoints dir, or one step's dir.")
flags.DEFINE_string("workdir", None, "New run directory for the grown checkpoint.")
flags.DEFINE_integer("stage", None, "Stage of the config to grow into (default: inferred).")
flags.mark_flags_as_required(["config", "from", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  run_command(grow)


def grow() -> None:
  init_distributed(FLAGS.config)  # multi-host: every process runs this command
  cert = stages.grow_offline(FLAGS.config, FLAGS["from"].value, FLAGS.workdir, FLAGS.stage)
  print(boundary.certificate_text(cert), flush=True)
  if cert.get("preempted"):
    print("SIGTERM during growth: the grown checkpoint is saved; exiting", flush=True)


if __name__ == "__main__":
  app.run(main)
