"""Branch-Train-MiX from a seed checkpoint: train the branches, mix them into an MoE, train the MoE.

  python -m moegrow.btx --config=<run config with a `btx` section> --workdir=<new dir>
Rerun the same command to resume: finished branches, the mix and the MoE's checkpoints are kept.
The `btx` section is documented in moegrow/orchestrate/branching.py and docs/merging.md.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moegrow.cli import run_command
from moegrow.distributed import init_distributed
from moegrow.orchestrate import branching

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config with a `btx` section.")
flags.DEFINE_string("workdir", None, "Run directory: branches, the mix and the MoE's training.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if "btx" not in FLAGS.config:
    raise app.UsageError("this config has no `btx` section (merging finished runs is `python -m moegrow.merge`)")
  run_command(lambda: (init_distributed(FLAGS.config), branching.btx_run(FLAGS.config, FLAGS.workdir)))


if __name__ == "__main__":
  app.run(main)
