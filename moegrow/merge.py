"""Merge finished checkpoints into a new run: soups, task arithmetic, TIES, DARE, SLERP, Model Stock.

  python -m moegrow.merge --config=<run config with a `merge` section> --workdir=<new dir>
then `python -m moegrow.main --config=<the same config> --workdir=<the same dir>` trains it on.
The `merge` section is documented in moegrow/orchestrate/merging.py and docs/merging.md.
Branch-Train-MiX (a `btx` section) has its own command, `python -m moegrow.btx`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moegrow.cli import run_command
from moegrow.distributed import init_distributed
from moegrow.orchestrate import merging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config with a `merge` section.")
flags.DEFINE_string("workdir", None, "New run directory for the merged checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if "btx" in FLAGS.config:
    raise app.UsageError("this config has a `btx` section: Branch-Train-MiX runs with "
                         "`python -m moegrow.btx --config=... --workdir=...`")
  run_command(lambda: (init_distributed(FLAGS.config), merging.merge_run(FLAGS.config, FLAGS.workdir)))


if __name__ == "__main__":
  app.run(main)
