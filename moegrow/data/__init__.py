"""Data: the local corpora as TFDS builders (`corpora`), the tokenizers (`tokenizer`: bytes or a
Hugging Face tokenizer.json) and the resumable grain pipeline (`pipeline`: packing, mixtures,
per-host shards). The names below are the public API; `from moegrow import data` then
`data.make_train_iter(...)`."""
from moegrow.data.corpora import LOCAL_DATASETS, SHAKESPEARE_VALIDATION, build, get_builder
from moegrow.data.pipeline import (Replay, ShardedIterator, domain_name, domain_order, eval_batches,
                                   make_sharded_train_iter, make_train_iter, stage_start)
from moegrow.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, SubwordTokenizer, check_vocab,
                                    decode, encode)
from moegrow.data.tokenizer import load as load_tokenizer

__all__ = ["LOCAL_DATASETS", "SHAKESPEARE_VALIDATION", "build", "get_builder", "BOS_ID", "EOS_ID", "PAD_ID",
           "VOCAB_SIZE", "ByteTokenizer", "SubwordTokenizer", "check_vocab", "load_tokenizer", "Replay",
           "ShardedIterator", "decode", "domain_name", "domain_order", "encode", "eval_batches",
           "make_sharded_train_iter", "make_train_iter", "stage_start"]
