"""Byte-level tokens and a resumable grain input pipeline over the corpora.

Tokenizer: byte level. Ids 0..255 are raw bytes, then PAD/BOS/EOS.
Datasets: the local TFDS builders in ``moegrow.data.corpora`` (``shakespeare_plays``,
``python_stdlib``) or any TFDS dataset prepared as ArrayRecord in ``data_dir``.

Pipeline (per dataset, per host): source[process_index::process_count] ->
shuffle(seed, reshuffled every epoch) -> repeat forever -> encode -> pack
into windows of seq_len + 1 tokens -> grain mix by weight -> batch.
Everything runs in-process; the iterator state (``get_state()``) is a small
JSON-serialisable dict of ints/bools (record indices + offset in the current
document), so ``set_state`` restores the stream exactly.
Many hosts: ``make_sharded_train_iter`` cuts the global stream into data
shards (by default one per process) and each process reads its own; the same
shard count gives the same global batches on any number of processes.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import grain
import numpy as np

from moegrow.data.corpora import data_source, own_name, text_of

# ----------------------------------------------------------------- tokenizer
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259


def encode(text: bytes | str) -> np.ndarray:
  """Encodes text as int32 ``[BOS, *utf8_bytes, EOS]``."""
  if isinstance(text, str):
    text = text.encode('utf-8')
  raw = np.frombuffer(bytes(text), dtype=np.uint8)
  out = np.empty(raw.size + 2, dtype=np.int32)
  out[0], out[1:-1], out[-1] = BOS_ID, raw, EOS_ID
  return out


def decode(ids) -> str:
  """Decodes token ids to text, dropping special ids (utf-8, 'replace')."""
  ids = np.asarray(ids).reshape(-1)
  return bytes(ids[ids < 256].astype(np.uint8)).decode('utf-8', 'replace')


def domain_name(name: str) -> str:
  """Short metric name: ``'c4/en:3.0.1' -> 'c4'``, ``'lm1b' -> 'lm1b'``."""
  return name.split(':')[0].split('/')[0]


# ------------------------------------------------------------------- packing
class _PackIterator(grain.DatasetIterator):
  """Concatenates token arrays from the parent and cuts fixed windows.

  State = parent state *before* the current document was read + the offset
  of the next unread token in it; restoring re-reads that one document.
  """

  def __init__(self, parent: grain.DatasetIterator, window: int):
    super().__init__(parent)
    self._window = window
    self._doc = np.zeros((0,), np.int32)
    self._pos = 0
    self._doc_state = copy.deepcopy(parent.get_state())

  def __next__(self) -> np.ndarray:
    pieces, need = [], self._window
    while need:
      if self._pos == self._doc.size:
        self._doc_state = copy.deepcopy(self._parent.get_state())
        self._doc, self._pos = next(self._parent), 0
      take = min(need, self._doc.size - self._pos)
      pieces.append(self._doc[self._pos:self._pos + take])
      self._pos += take
      need -= take
    return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)

  def get_state(self) -> dict[str, Any]:
    return {'doc_state': copy.deepcopy(self._doc_state), 'pos': self._pos}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._doc_state = copy.deepcopy(state['doc_state'])
    self._parent.set_state(copy.deepcopy(self._doc_state))
    self._pos = int(state['pos'])
    self._doc = np.zeros((0,), np.int32)
    if self._pos:  # Mid-document: reload the document the offset refers to.
      self._doc = next(self._parent)
      if self._pos > self._doc.size:
        raise ValueError(f'Data state: offset pos={self._pos} is past the end of its document '
                         f'({self._doc.size} tokens); the iterator state is corrupt.')


class _PackIterDataset(grain.IterDataset):
  """IterDataset of packed windows of ``window`` tokens."""

  def __init__(self, parent: grain.IterDataset, window: int):
    super().__init__(parent)
    self._window = window

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._window)


# Few read threads and a short prefetch: a document fills many windows, and a
# large buffer of decoded documents would cost memory (int32 = 4x the text).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _seed_for(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _split_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = batch['tokens']
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'domain': np.asarray(batch['domain'], np.int32)}


def _check_mixture(mixture: Mapping[str, float]) -> dict[str, float]:
  if not mixture:
    raise ValueError('Empty mixture: give at least one {name: weight}.')
  weights = {k: float(v) for k, v in mixture.items()}
  bad = {k: v for k, v in weights.items() if not v >= 0 or not np.isfinite(v)}
  if bad:
    raise ValueError(f'Mixture weights must be finite and >= 0, got {bad}.')
  total = sum(weights.values())
  if total <= 0:
    raise ValueError(f'Mixture weights are all 0: {weights}.')
  return {k: v / total for k, v in weights.items()}


def make_train_iter(mixture: Mapping[str, float], *, seq_len: int,
                    global_batch: int, seed: int, data_dir: str,
                    process_index: int = 0, process_count: int = 1,
                    split: str = 'train',
                    text_key: str = 'text') -> grain.DatasetIterator:
  """Infinite, exactly resumable iterator of packed training batches.

  Args:
    mixture: dataset name -> weight (>= 0, normalised; 0 drops the dataset
      but keeps its domain index). Dict order defines the domain indices.
    seq_len: tokens per row; windows of ``seq_len + 1`` tokens are cut from
      the concatenated documents.
    global_batch: rows per step over all processes.
    seed: shuffling seed (documents are reshuffled every epoch).
    data_dir: TFDS data dir (our builders are prepared there if needed).
    process_index, process_count: this host reads documents
      ``[process_index::process_count]`` of every dataset.
    split: split to read.
    text_key: text feature of non-local TFDS datasets (ours use 'text').

  Returns:
    grain iterator with ``__next__``, ``get_state()`` (JSON-serialisable dict)
    and ``set_state(state)``, yielding ``{'inputs', 'targets': int32[B, T],
    'domain': int32[B]}`` with ``B = global_batch // process_count``.
  """
  if seq_len < 1 or global_batch < 1:
    raise ValueError(f'Need seq_len >= 1 and global_batch >= 1, got '
                     f'seq_len={seq_len}, global_batch={global_batch}.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Bad process_index={process_index} for '
                     f'process_count={process_count}.')
  if global_batch % process_count:
    raise ValueError(f'global_batch={global_batch} is not divisible by '
                     f'process_count={process_count}.')
  local_batch = global_batch // process_count
  weights = _check_mixture(mixture)
  sources = {name: data_source(name, split, data_dir) for name in weights}

  parts, part_weights = [], []
  for index, (name, weight) in enumerate(weights.items()):
    if weight == 0:
      continue
    key = 'text' if own_name(name) else text_key
    ds = grain.MapDataset.source(sources[name])[process_index::process_count]
    if len(ds) == 0:  # pylint: disable=g-explicit-length-test
      raise ValueError(f'Dataset {name!r} split {split!r} has no documents '
                       f'for process {process_index}/{process_count}.')
    ds = ds.shuffle(seed=_seed_for(seed, index)).repeat(None)
    ds = ds.map(lambda ex, key=key: encode(text_of(ex, key)))
    packed = _PackIterDataset(ds.to_iter_dataset(_READ_OPTIONS), seq_len + 1)
    domain = np.int32(index)
    parts.append(packed.map(lambda w, d=domain: {'tokens': w, 'domain': d}))
    part_weights.append(weight)
  mixed = parts[0] if len(parts) == 1 else grain.IterDataset.mix(
      parts, part_weights)
  batched = mixed.batch(local_batch, drop_remainder=True).map(_split_batch)
  return batched.__iter__()


_MAX_INDEX = 2**53  # record indices and offsets of any real dataset are far below this


def check_state(state: Any, path: str = 'data state') -> None:
  """A data-iterator state read from a checkpoint is plain JSON data: dicts with string keys and
  lists of them, leaves booleans or integers in [0, 2**53). ValueError naming the first bad
  entry otherwise (a crafted position must not make resume allocate without bound)."""
  if isinstance(state, Mapping):
    for k, v in state.items():
      if not isinstance(k, str):
        raise ValueError(f'{path}: key {k!r} is not a string')
      check_state(v, f'{path}.{k}')
  elif isinstance(state, list):
    for i, v in enumerate(state):
      check_state(v, f'{path}[{i}]')
  elif isinstance(state, bool):
    pass
  elif isinstance(state, int):
    if not 0 <= state < _MAX_INDEX:
      raise ValueError(f'{path}={state} is out of range [0, 2**53): the iterator state is corrupt')
  else:
    raise ValueError(f'{path}={state!r} ({type(state).__name__}) is not an integer or a boolean: '
                     f'the iterator state is corrupt')


class ShardedIterator:
  """The rows of this process's data shards, concatenated in shard order.

  Shard ``s`` of ``S`` is ``make_train_iter(process_index=s, process_count=S)``
  (documents ``[s::S]``, ``global_batch // S`` rows), so the global stream
  depends on ``S`` only: process ``p`` of ``P`` (``S % P == 0``) holds shards
  ``[p*S/P, (p+1)*S/P)``, i.e. the rows its devices hold in the global batch.
  State: ``{'num_shards': S, 'shards': {str(s): state}}`` for this process's
  shards; ``set_state`` takes any state holding them (e.g. every process's
  merged), or a single shard's plain state when ``S == 1``.
  """

  def __init__(self, iters: Mapping[int, Any], num_shards: int):
    self._iters = dict(iters)
    self.num_shards = num_shards

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self._iters.values()]
    if len(batches) == 1:
      return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {'num_shards': self.num_shards,
            'shards': {str(s): it.get_state() for s, it in self._iters.items()}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    check_state(state)
    if 'shards' not in state:  # a plain single-stream state
      if self.num_shards != 1:
        raise ValueError(f'Data state of one stream cannot resume '
                         f'{self.num_shards} data shards.')
      state = {'num_shards': 1, 'shards': {'0': state}}
    if int(state['num_shards']) != self.num_shards:
      raise ValueError(f'Data state has {state["num_shards"]} shards, the '
                       f'pipeline {self.num_shards} (data.shards): the '
                       'stream cannot resume with another shard count.')
    missing = [s for s in self._iters if str(s) not in state['shards']]
    if missing:
      raise ValueError(f'Data state lacks shards {missing}.')
    for s, it in self._iters.items():
      it.set_state(copy.deepcopy(state['shards'][str(s)]))


def make_sharded_train_iter(mixture: Mapping[str, float], *, num_shards: int = 0,
                            process_index: int = 0, process_count: int = 1,
                            global_batch: int, **kwargs) -> ShardedIterator:
  """``make_train_iter`` over ``num_shards`` data shards (0: one per process)
  of which this process reads its own (see ``ShardedIterator``)."""
  shards = num_shards or process_count
  if shards < 1 or shards % process_count:
    raise ValueError(f'data shards={shards} must be a positive multiple of '
                     f'the process count {process_count}.')
  if global_batch % shards:
    raise ValueError(f'global_batch={global_batch} is not divisible by '
                     f'{shards} data shards.')
  per = shards // process_count
  return ShardedIterator({s: make_train_iter(
      mixture, global_batch=global_batch, process_index=s, process_count=shards, **kwargs)
      for s in range(process_index * per, (process_index + 1) * per)}, shards)


def eval_batches(name: str, *, seq_len: int, batch_size: int,
                 num_batches: int, data_dir: str, split: str = 'validation',
                 text_key: str = 'text') -> list[dict[str, Any]]:
  """Deterministic evaluation batches of one dataset (no shuffling).

  Documents are read in the stored order of ``split``, encoded, concatenated
  and cut into windows of ``seq_len + 1`` exactly like training. If the split
  has fewer than ``num_batches * batch_size`` windows, fewer (full) batches
  are returned; if it cannot fill even one batch, the token stream wraps
  around so that exactly one batch is returned.

  Each batch: ``inputs``/``targets`` int32[batch_size, seq_len],
  ``domain`` int32[batch_size] (zeros), ``num_tokens`` (int, number of
  targets) and ``num_bytes`` (int, targets that are real bytes, i.e. not
  BOS/EOS/PAD). bits/byte = mean_loss_nats / ln 2 * num_tokens / num_bytes.
  """
  if min(seq_len, batch_size, num_batches) < 1:
    raise ValueError(f'Need positive seq_len/batch_size/num_batches, got '
                     f'{seq_len}/{batch_size}/{num_batches}.')
  source = data_source(name, split, data_dir)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Split {split!r} of {name!r} is empty.')
  key = 'text' if own_name(name) else text_key
  window = seq_len + 1
  need = num_batches * batch_size * window
  chunks, total = [], 0
  for i in range(len(source)):
    chunks.append(encode(text_of(source[i], key)))
    total += chunks[-1].size
    if total >= need:
      break
  stream = np.concatenate(chunks)
  rows = min(num_batches, stream.size // (window * batch_size)) * batch_size
  if rows == 0:  # Too small for one batch: wrap around.
    rows = batch_size
    stream = np.resize(stream, rows * window)
  windows = stream[:rows * window].reshape(-1, batch_size, window)
  out = []
  for w in windows:
    targets = w[:, 1:]
    out.append({'inputs': w[:, :-1], 'targets': targets,
                'domain': np.zeros((batch_size,), np.int32),
                'num_tokens': int(targets.size),
                'num_bytes': int((targets < 256).sum())})
  return out
