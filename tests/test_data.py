"""Tests for moegrow.data on the real local corpora (built once per session)."""
import hashlib
import json
import os
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moegrow import data

MIX = {'shakespeare_plays': 0.5, 'python_stdlib': 0.5}


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  for name in data.LOCAL_DATASETS:
    data.build(name, d)
    data.build(name, d)  # Idempotent: second call is a no-op.
  return d


def _docs(name, split, data_dir):
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  return [(ex['id'].decode(), ex['text']) for ex in (src[i] for i in range(len(src)))]


def _corpus(name, data_dir, split='train', shard=slice(None)):
  return b'\0'.join(t for _, t in _docs(name, split, data_dir)[shard])


def _segments(row, min_len=32):
  """Byte runs of a token row between special tokens."""
  cuts = np.flatnonzero(row >= 256)
  bounds = zip(np.r_[-1, cuts] + 1, np.r_[cuts, row.size])
  return [bytes(row[a:b].astype(np.uint8)) for a, b in bounds if b - a >= min_len]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
      for x, y in zip(a, b))


@pytest.mark.parametrize('name', ['shakespeare_plays', 'python_stdlib'])
def test_splits_disjoint_and_documented_sizes(data_dir, name):
  train = _docs(name, 'train', data_dir)
  val = _docs(name, 'validation', data_dir)
  assert {i for i, _ in train}.isdisjoint(i for i, _ in val)
  assert {t for _, t in train}.isdisjoint(t for _, t in val)
  if name == 'shakespeare_plays':
    assert (len(train), len(val)) == (34, 4)
    stems = {os.path.basename(i)[:-len('.md')] for i, _ in val}
    assert stems == set(data.SHAKESPEARE_VALIDATION)
    assert sum(len(t) for _, t in train + val) > 5_000_000
  else:
    root = sysconfig.get_paths()['stdlib']
    texts = set()
    for dirpath, dirs, files in os.walk(root):
      dirs[:] = [d for d in dirs if d not in ('site-packages', 'dist-packages')]
      for f in files:
        if f.endswith('.py'):
          with open(os.path.join(dirpath, f), 'rb') as fh:
            texts.add(fh.read())
    assert {t for _, t in train + val} == texts
    assert len(train) + len(val) == len(texts) > 1000
    rule = lambda i: int(hashlib.sha1(i.encode()).hexdigest(), 16) % 20 == 0
    assert all(rule(i) for i, _ in val) and not any(rule(i) for i, _ in train)
    assert 0.02 < len(val) / len(texts) < 0.09


def test_tokenizer_roundtrip_and_shift(data_dir):
  text = 'Wherefore art thou, Romeo? héllo ✓\n'
  ids = data.encode(text)
  assert ids.dtype == np.int32 and ids[0] == data.BOS_ID and ids[-1] == data.EOS_ID
  assert data.decode(ids) == text and data.decode(data.encode(text.encode())) == text
  assert data.decode([data.PAD_ID, 104, 105, data.EOS_ID]) == 'hi'
  assert data.domain_name('c4/en:3.0.1') == 'c4'
  assert data.domain_name('shakespeare_plays') == 'shakespeare_plays'
  it = data.make_train_iter(MIX, seq_len=64, global_batch=8, seed=1, data_dir=data_dir)
  for b in _take(it, 3):
    assert b['inputs'].shape == b['targets'].shape == (8, 64)
    assert b['domain'].shape == (8,)
    assert all(b[k].dtype == np.int32 for k in ('inputs', 'targets', 'domain'))
    assert b['replay'].dtype == np.float32 and not b['replay'].any()  # no replay configured
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
    assert b['inputs'].min() >= 0 and b['targets'].max() < data.VOCAB_SIZE


def test_same_seed_same_batches_other_seed_differs(data_dir):
  kw = dict(seq_len=128, global_batch=16, data_dir=data_dir)
  a = _take(data.make_train_iter(MIX, seed=3, **kw), 4)
  b = _take(data.make_train_iter(MIX, seed=3, **kw), 4)
  c = _take(data.make_train_iter(MIX, seed=4, **kw), 4)
  assert _same(a, b)
  assert not any(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, c))


def test_a_state_is_refused_by_a_stream_of_another_seed(data_dir):
  kw = dict(seq_len=64, global_batch=8, data_dir=data_dir)
  it = data.make_train_iter(MIX, seed=3, **kw)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  with pytest.raises(ValueError, match='another train.seed'):
    data.make_train_iter(MIX, seed=4, **kw).set_state(state)
  data.make_train_iter(MIX, seed=3, **kw).set_state(state)  # the same seed resumes


@pytest.mark.parametrize('mix,split,seq_len,batch,n,m', [
    (MIX, 'train', 256, 32, 5, 4),
    # 4 plays of ~0.5M tokens: 10 steps of 64k tokens cross an epoch boundary.
    ({'shakespeare_plays': 1.0}, 'validation', 1023, 64, 6, 5),
])
def test_iterator_resumes_exactly(data_dir, mix, split, seq_len, batch, n, m):
  kw = dict(seq_len=seq_len, global_batch=batch, seed=7, data_dir=data_dir, split=split)
  it = data.make_train_iter(mix, **kw)
  _take(it, n)
  state = it.get_state()
  blob = json.dumps(state)  # The state is a JSON-serialisable dict.
  expected = _take(it, m)
  fresh = data.make_train_iter(mix, **kw)
  fresh.set_state(json.loads(blob))
  assert _same(_take(fresh, m), expected)
  fresh.set_state(json.loads(blob))  # Restoring an iterator that already ran.
  assert _same(_take(fresh, m), expected)


def test_mixture_weights_and_domains(data_dir):
  mix = {'shakespeare_plays': 0.8, 'python_stdlib': 0.2}
  it = data.make_train_iter(mix, seq_len=128, global_batch=32, seed=0, data_dir=data_dir)
  batches = _take(it, 50)
  dom = np.concatenate([b['domain'] for b in batches])
  se = np.sqrt(0.8 * 0.2 / dom.size)
  assert set(np.unique(dom)) == {0, 1}
  assert abs((dom == 0).mean() - 0.8) < 4 * se
  corpora = [_corpus(n, data_dir) for n in mix]
  checked = 0
  for b in batches[:2]:
    for row, d in zip(b['inputs'], b['domain']):
      for seg in _segments(row):
        assert seg in corpora[d] and seg not in corpora[1 - d]
        checked += 1
  assert checked > 32
  # A zero weight drops a dataset but keeps the mixture's domain indices.
  it = data.make_train_iter({'python_stdlib': 0.0, 'shakespeare_plays': 2.0},
                            seq_len=64, global_batch=8, seed=0, data_dir=data_dir)
  assert all((b['domain'] == 1).all() for b in _take(it, 3))


def test_per_host_sharding(data_dir):
  mix = {'shakespeare_plays': 1.0}
  kw = dict(seq_len=256, global_batch=32, seed=5, data_dir=data_dir, process_count=2)
  hosts = [_take(data.make_train_iter(mix, process_index=p, **kw), 4) for p in (0, 1)]
  rows = []
  for p, batches in enumerate(hosts):
    corpus = _corpus('shakespeare_plays', data_dir, shard=slice(p, None, 2))
    for b in batches:
      assert b['inputs'].shape == (16, 256) and b['domain'].shape == (16,)
      rows += [r.tobytes() for r in b['inputs']]
      assert all(s in corpus for r in b['inputs'] for s in _segments(r))
  assert len(set(rows)) == len(rows)  # Hosts' local batches are disjoint.
  with pytest.raises(ValueError, match='global_batch=30.*process_count=4'):
    data.make_train_iter(mix, seq_len=8, global_batch=30, seed=0,
                         data_dir=data_dir, process_count=4)


def test_eval_batches(data_dir):
  kw = dict(seq_len=128, batch_size=4, data_dir=data_dir)
  a = data.eval_batches('python_stdlib', num_batches=3, **kw)
  assert _same(a, data.eval_batches('python_stdlib', num_batches=3, **kw))
  assert len(a) == 3
  first = _docs('python_stdlib', 'validation', data_dir)[0][1]
  assert a[0]['inputs'][0, 0] == data.BOS_ID
  assert data.decode(a[0]['inputs'][0]) == first[:127].decode('utf-8', 'replace')
  for b in a:
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
    assert b['num_tokens'] == 4 * 128
    assert b['num_bytes'] == int((b['targets'] < 256).sum()) <= b['num_tokens']
  # Shakespeare validation has ~0.56M tokens: fewer full batches are returned.
  few = data.eval_batches('shakespeare_plays', seq_len=1023, batch_size=64,
                          num_batches=100, data_dir=data_dir)
  assert 5 <= len(few) < 100
  # Less than one batch of tokens: the stream wraps around to fill one batch.
  one = data.eval_batches('shakespeare_plays', seq_len=2047, batch_size=512,
                          num_batches=2, data_dir=data_dir)
  assert len(one) == 1 and one[0]['inputs'].shape == (512, 2047)


def test_errors(data_dir):
  with pytest.raises(ValueError, match=r"'no_such_corpus'.*data_dir="):
    data.make_train_iter({'no_such_corpus': 1.0}, seq_len=8, global_batch=2,
                         seed=0, data_dir=data_dir)
  with pytest.raises(ValueError, match=r"'no_such_corpus'"):
    data.eval_batches('no_such_corpus', seq_len=8, batch_size=2, num_batches=1,
                      data_dir=data_dir)
  for bad in ({'python_stdlib': -1.0, 'shakespeare_plays': 2.0},
              {'python_stdlib': 0.0}, {}):
    with pytest.raises(ValueError, match='weight|mixture|Mixture'):
      data.make_train_iter(bad, seq_len=8, global_batch=2, seed=0, data_dir=data_dir)
