"""Merge finished checkpoints into a new run (soups, task arithmetic, TIES, DARE, SLERP, Model
Stock), or run Branch-Train-MiX from a seed checkpoint (branches, mix, MoE training).

  python -m moegrow.merge --config=<run config with a `merge` section> --workdir=<new dir>
then `python -m moegrow.main --config=<the same config> --workdir=<the same dir>` trains it on.
  python -m moegrow.merge --config=<run config with a `btx` section> --workdir=<new dir>
runs every branch, the mix and the MoE's training (rerun it to resume).
See moegrow/train/merging.py and moegrow/train/branching.py for the two sections.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moegrow.cli import run_command
from moegrow.distributed import init_distributed
from moegrow.train import branching, merging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config with a `merge` section.")
flags.DEFINE_string("workdir", None, "New run directory for the merged checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  run = branching.btx_run if "btx" in FLAGS.config else merging.merge_run
  run_command(lambda: (init_distributed(FLAGS.config), run(FLAGS.config, FLAGS.workdir)))


if __name__ == "__main__":
  app.run(main)
