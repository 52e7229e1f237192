"""Data: the local corpora as TFDS builders (`corpora`) and the resumable grain pipeline
(`pipeline`: byte tokens, packing, mixtures, per-host shards). The names below are the public
API; `from moegrow import data` then `data.make_train_iter(...)`."""
from moegrow.data.corpora import LOCAL_DATASETS, SHAKESPEARE_VALIDATION, build, get_builder
from moegrow.data.pipeline import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, Replay, ShardedIterator, decode, domain_name,
                                   domain_order, encode, eval_batches, make_sharded_train_iter, make_train_iter,
                                   stage_start)

__all__ = ["LOCAL_DATASETS", "SHAKESPEARE_VALIDATION", "build", "get_builder", "BOS_ID", "EOS_ID", "PAD_ID",
           "VOCAB_SIZE", "Replay", "ShardedIterator", "decode", "domain_name", "domain_order", "encode", "eval_batches",
           "make_sharded_train_iter", "make_train_iter", "stage_start"]
