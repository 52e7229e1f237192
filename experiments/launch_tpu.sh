#!/usr/bin/env bash
# Run a moegrow config on every worker of a Cloud TPU VM pod slice.
#
#   experiments/launch_tpu.sh <tpu-name> <zone> <config> <workdir> [extra flags...]
#   experiments/launch_tpu.sh my-v4-64 us-central2-b configs/lm.py:pod gs://my-bucket/runs/pod1
#   MODULE=moegrow.btx experiments/launch_tpu.sh ...   # a config with a `btx` (or, moegrow.merge, `merge`) section
#
# Check first, on any machine, that every program of the run fits the slice:
#   python -m moegrow.aot --config=<config> --topology=<slice, e.g. v4-128>
# Every worker runs the same command; `config.distributed.enabled=True` makes each call
# jax.distributed.initialize(), which discovers the pod's coordinator and its own process id.
# Each host then reads its own shard of the data (process_index::process_count), the mesh spans
# all chips (configs/lm.py:pod: data=-1, fsdp=8, expert=8), and Orbax writes one checkpoint
# together to the (shared, e.g. GCS) workdir. Re-running the same command resumes; a preempted
# TPU VM gets SIGTERM, saves a checkpoint and exits 0.
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
REPO=${REPO:-https://github.com/moegrow/moegrow.git}
CMD="set -e; if [ ! -d moegrow ]; then git clone -q ${REPO} moegrow; fi; cd moegrow && git pull -q; \
python3.11 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]' && \
python -m ${MODULE:-moegrow.main} --config=${CONFIG} --workdir=${WORKDIR} --config.distributed.enabled=True \
  --config.data.data_dir=\${TFDS_DATA_DIR:-gs://my-bucket/tensorflow_datasets} $*"
gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" --worker=all --command "${CMD}"
