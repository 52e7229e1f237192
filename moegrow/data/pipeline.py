"""Tokens and a resumable grain input pipeline over the corpora.

Tokenizer (``moegrow.data.tokenizer``, ``tokenizer=`` below): byte level by default (ids 0..255
are raw bytes, then PAD/BOS/EOS), or a Hugging Face ``tokenizer.json``; every document is
``[BOS, *ids, EOS]`` (no BOS if the tokenizer has none) and packed the same way whichever the tokenizer.
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
import zlib
from typing import Any, Mapping

import grain
import numpy as np

from moegrow.data import tokenizer as tokenization
from moegrow.data.corpora import data_source, own_name, text_of


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


def _seed_for(seed: int, name: str) -> int:
  """A domain's shuffling seed: fixed by the run's seed and the domain's NAME (not its position
  in the mixture), so a stage may add, drop or reorder domains and every stream stays the same."""
  return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


class Replay:
  """Replay of earlier data within a stage: a `fraction` of the rows comes from `mixture` (the
  old domains), warmed in linearly from 0 over the stage's first `warmin_steps` steps (0: at once).
  Row weights at step s: (1 - r_s) * new + r_s * old, r_s = fraction * min(1, s / warmin_steps)."""

  def __init__(self, mixture: Mapping[str, float], fraction: float, warmin_steps: int = 0):
    if not 0 <= fraction <= 1:
      raise ValueError(f'replay fraction={fraction} must be in [0, 1]')
    if warmin_steps < 0:
      raise ValueError(f'replay warmin_steps={warmin_steps} must be >= 0')
    self.mixture = _check_mixture(mixture)
    self.fraction, self.warmin_steps = float(fraction), int(warmin_steps)

  def at(self, step: int) -> float:
    if self.warmin_steps and step < self.warmin_steps:
      return self.fraction * step / self.warmin_steps
    return self.fraction


class _MixIterator(grain.DatasetIterator):
  """Rows drawn from named component streams with step-dependent weights.

  Row n picks its domain with a uniform number seeded by (seed, n), so the choice depends only on
  the row count since the stage began. State: {'rows': n, 'parts': {name: component state},
  'seed': the mixing seed, 'tokenizer': its fingerprint (absent for bytes)} (a state is refused
  by a stream of another seed or tokenizer: positions count its tokens);
  components are restored BY NAME: a state from another mixture resumes every domain both share,
  starts new ones fresh, and keeps the states of dropped ones for a later stage.
  """

  def __init__(self, parts: dict[str, grain.DatasetIterator], weights_at, rows_per_step: int, seed: int,
               tok: tokenization.Tokenizer):
    super().__init__(list(parts.values()))
    self._parts, self._names = parts, list(parts)
    self._weights_at, self._rows_per_step, self._seed, self._tok = weights_at, rows_per_step, seed, tok
    self._rows, self._kept = 0, {}

  def __next__(self):
    w = self._weights_at(self._rows // self._rows_per_step)
    u = np.random.default_rng([self._seed, self._rows]).random()
    i = min(int(np.searchsorted(np.cumsum(w), u * w.sum(), side='right')), len(w) - 1)
    self._rows += 1
    return next(self._parts[self._names[i]])

  def get_state(self) -> dict[str, Any]:
    parts = dict(self._kept)
    parts.update({n: it.get_state() for n, it in self._parts.items()})
    state = {'rows': self._rows, 'parts': parts, 'seed': self._seed}
    if self._tok.fingerprint is not None:  # byte states stay as they always were
      state['tokenizer'] = self._tok.fingerprint
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or 'parts' not in state or 'rows' not in state:
      raise ValueError("data state has no 'rows' and 'parts' (per-domain states by name): it was "
                       'written by another version of the pipeline')
    if 'seed' in state and int(state['seed']) != self._seed:  # positions mean nothing in another order
      raise ValueError('data state was written by a run with another train.seed (its shuffling order); '
                       'the stream cannot resume under this seed: resume with the seed that wrote it')
    if state.get('tokenizer') != self._tok.fingerprint:  # positions count another tokenizer's tokens
      wrote = 'bytes' if state.get('tokenizer') is None else 'another tokenizer.json (or other special tokens)'
      raise ValueError(f'data state was written by a run with data.tokenizer={wrote}; the stream cannot resume '
                       f'under data.tokenizer={self._tok.name}: resume with the tokenizer that wrote it')
    self._rows = int(state['rows'])
    for name, part in state['parts'].items():
      if name in self._parts:
        self._parts[name].set_state(copy.deepcopy(part))
    self._kept = {n: copy.deepcopy(p) for n, p in state['parts'].items() if n not in self._parts}


class _MixDataset(grain.IterDataset):

  def __init__(self, parts: dict[str, grain.IterDataset], weights_at, rows_per_step: int, seed: int,
               tok: tokenization.Tokenizer):
    super().__init__(list(parts.values()))
    self._named = parts
    self._weights_at, self._rows_per_step, self._seed, self._tok = weights_at, rows_per_step, seed, tok

  def __iter__(self) -> _MixIterator:
    return _MixIterator({n: p.__iter__() for n, p in self._named.items()}, self._weights_at,
                        self._rows_per_step, self._seed, self._tok)


def _split_batch(batch: Mapping[str, np.ndarray], replayed=()) -> dict[str, np.ndarray]:
  tokens = batch['tokens']
  domain = np.asarray(batch['domain'], np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'domain': domain,
          'replay': np.isin(domain, replayed).astype(np.float32)}


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
                    text_key: str = 'text',
                    replay: Replay | None = None,
                    tokenizer: str | tokenization.Tokenizer = 'bytes',
                    vocab_size: int | None = None) -> grain.DatasetIterator:
  """Infinite, exactly resumable iterator of packed training batches.

  Args:
    mixture: dataset name -> weight (>= 0, normalised; 0 drops the dataset
      but keeps its domain index). Dict order defines the domain indices
      (``domain_order``: then replayed names not in it).
    seq_len: tokens per row; windows of ``seq_len + 1`` tokens are cut from
      the concatenated documents.
    global_batch: rows per step over all processes.
    seed: shuffling seed (documents are reshuffled every epoch).
    data_dir: TFDS data dir (our builders are prepared there if needed).
    process_index, process_count: this host reads documents
      ``[process_index::process_count]`` of every dataset.
    split: split to read.
    text_key: text feature of non-local TFDS datasets (ours use 'text').
    replay: optional replay of old domains (see ``Replay``).
    tokenizer: ``data.tokenizer``: 'bytes', a tokenizer.json (or a folder holding one), or a
      loaded tokenizer (``tokenizer.load``).
    vocab_size: the model's embedding rows, if given: a tokenizer with more ids is refused.

  Returns:
    grain iterator with ``__next__``, ``get_state()`` (JSON-serialisable dict
    ``{'rows', 'parts': {name: state}, 'seed'[, 'tokenizer']}``: resumable by domain name) and
    ``set_state(state)``, yielding ``{'inputs', 'targets': int32[B, T],
    'domain': int32[B], 'replay': float32[B]}`` ('replay' is 1 on rows of
    replayed domains, those only in ``replay.mixture``) with ``B = global_batch // process_count``.
  """
  local_batch = _local_batch(seq_len, global_batch, process_index, process_count)
  tok = tokenization.load(tokenizer)
  if vocab_size is not None:
    tokenization.check_vocab(tok, vocab_size)
  domains, new, old = _domain_weights(mixture, replay)

  def weights_at(step: int) -> np.ndarray:
    r = replay.at(step) if replay is not None else 0.0
    return (1.0 - r) * new + r * old
  live = [n for i, n in enumerate(domains) if new[i] > 0 or old[i] > 0]
  parts = {}
  for name in live:
    docs = _process_documents(name, split, data_dir, process_index, process_count, seed)
    key = 'text' if own_name(name) else text_key
    parts[name] = _packed_windows(docs, tok, key, seq_len, domains.index(name))
  keep = np.array([n in live for n in domains])
  mixed = _MixDataset(parts, lambda s: weights_at(s)[keep], local_batch, _seed_for(seed, '<mix>'), tok)
  replayed = np.array([i for i, n in enumerate(domains) if new[i] == 0 and old[i] > 0], np.int32)
  batched = mixed.batch(local_batch, drop_remainder=True).map(lambda b: _split_batch(b, replayed))
  return batched.__iter__()  # its state is the mixer's: {'rows', 'parts'}


def _local_batch(seq_len: int, global_batch: int, process_index: int, process_count: int) -> int:
  """This process's rows per step; ValueError for sizes that cannot be split so."""
  if seq_len < 1 or global_batch < 1:
    raise ValueError(f'Need seq_len >= 1 and global_batch >= 1, got '
                     f'seq_len={seq_len}, global_batch={global_batch}.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Bad process_index={process_index} for '
                     f'process_count={process_count}.')
  if global_batch % process_count:
    raise ValueError(f'global_batch={global_batch} is not divisible by '
                     f'process_count={process_count}.')
  return global_batch // process_count


def _domain_weights(mixture: Mapping[str, float],
                    replay: Replay | None) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(domains in ``domain_order``, the mixture's normalised weight of each, replay's weight of
  each); a domain missing from one has weight 0 there."""
  weights = _check_mixture(mixture)
  domains = domain_order(mixture, replay)
  old = dict.fromkeys(domains, 0.0)
  if replay is not None:
    old.update(replay.mixture)
  new = np.array([weights.get(n, 0.0) for n in domains])
  old = np.array([old[n] for n in domains])
  return domains, new, old


def _process_documents(name: str, split: str, data_dir: str, process_index: int, process_count: int,
                       seed: int) -> grain.MapDataset:
  """This process's documents ``[process_index::process_count]`` of one dataset split, shuffled
  (again every epoch) and repeated forever."""
  ds = grain.MapDataset.source(data_source(name, split, data_dir))[process_index::process_count]
  if len(ds) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Dataset {name!r} split {split!r} has no documents '
                     f'for process {process_index}/{process_count}.')
  return ds.shuffle(seed=_seed_for(seed, name)).repeat(None)


def _packed_windows(docs: grain.MapDataset, tok: tokenization.Tokenizer, text_key: str, seq_len: int,
                    domain: int) -> grain.IterDataset:
  """Documents tokenized (their text under ``text_key``) and packed into windows of ``seq_len + 1``
  tokens, each tagged with its domain id: {'tokens', 'domain'}."""
  ds = docs.map(lambda ex: tok.document(text_of(ex, text_key)))
  packed = _PackIterDataset(ds.to_iter_dataset(_READ_OPTIONS), seq_len + 1)
  d = np.int32(domain)
  return packed.map(lambda w: {'tokens': w, 'domain': d})


def domain_order(mixture: Mapping[str, float], replay: 'Replay | None' = None) -> list[str]:
  """The domains a train iterator's rows are indexed by (its batches' 'domain' ids): the
  mixture's names in order, then replayed names it lacks."""
  names = list(mixture)
  return names + [n for n in (replay.mixture if replay is not None else {}) if n not in mixture]


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


def stage_start(state: Mapping[str, Any]) -> dict[str, Any]:
  """An iterator state that ended one stage, as the start of the next (maybe of another
  mixture): every domain keeps its position, the row count (hence any replay ramp and the row
  mixing sequence) starts again from 0."""
  state = copy.deepcopy(dict(state))
  for shard in (state['shards'].values() if 'shards' in state else [state]):
    if isinstance(shard, dict) and 'rows' in shard:
      shard['rows'] = 0
  return state


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
  if 'tokenizer' in kwargs:  # read the file once for every shard
    kwargs['tokenizer'] = tokenization.load(kwargs['tokenizer'])
  return ShardedIterator({s: make_train_iter(
      mixture, global_batch=global_batch, process_index=s, process_count=shards, **kwargs)
      for s in range(process_index * per, (process_index + 1) * per)}, shards)


def eval_batches(name: str, *, seq_len: int, batch_size: int,
                 num_batches: int, data_dir: str, split: str = 'validation',
                 text_key: str = 'text',
                 tokenizer: str | tokenization.Tokenizer = 'bytes') -> list[dict[str, Any]]:
  """Deterministic evaluation batches of one dataset (no shuffling).

  Documents are read in the stored order of ``split``, encoded, concatenated
  and cut into windows of ``seq_len + 1`` exactly like training. If the split
  has fewer than ``num_batches * batch_size`` windows, fewer (full) batches
  are returned; if it cannot fill even one batch, the token stream wraps
  around so that exactly one batch is returned.

  Each batch: ``inputs``/``targets`` int32[batch_size, seq_len],
  ``domain`` int32[batch_size] (zeros), ``num_tokens`` (int, number of
  targets) and ``num_bytes`` (int, the UTF-8 bytes of text the targets stand
  for; bytes: the targets that are not BOS/EOS/PAD).
  bits/byte = mean_loss_nats / ln 2 * num_tokens / num_bytes.
  """
  if min(seq_len, batch_size, num_batches) < 1:
    raise ValueError(f'Need positive seq_len/batch_size/num_batches, got '
                     f'{seq_len}/{batch_size}/{num_batches}.')
  source = data_source(name, split, data_dir)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Split {split!r} of {name!r} is empty.')
  key = 'text' if own_name(name) else text_key
  tok = tokenization.load(tokenizer)
  window = seq_len + 1
  need = num_batches * batch_size * window
  chunks, sizes, total = [], [], 0
  for i in range(len(source)):
    ids, nbytes = tok.document_bytes(text_of(source[i], key))
    chunks.append(ids)
    sizes.append(nbytes)
    total += ids.size
    if total >= need:
      break
  stream, stream_bytes = np.concatenate(chunks), np.concatenate(sizes)
  rows = min(num_batches, stream.size // (window * batch_size)) * batch_size
  if rows == 0:  # Too small for one batch: wrap around.
    rows = batch_size
    stream, stream_bytes = np.resize(stream, rows * window), np.resize(stream_bytes, rows * window)
  windows = stream[:rows * window].reshape(-1, batch_size, window)
  window_bytes = stream_bytes[:rows * window].reshape(-1, batch_size, window)
  out = []
  for w, nb in zip(windows, window_bytes):
    targets = w[:, 1:]
    out.append({'inputs': w[:, :-1], 'targets': targets,
                'domain': np.zeros((batch_size,), np.int32),
                'num_tokens': int(targets.size),
                'num_bytes': int(nb[:, 1:].sum())})
  return out
