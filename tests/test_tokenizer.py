"""Subword tokenizers in the data pipeline (moegrow.data.tokenizer), on the real local corpora: a small
BPE is trained here on the corpora's text, saved as tokenizer.json and read back by the pipeline."""
import hashlib
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moegrow import data
from moegrow.configs import lm
from moegrow.orchestrate.validate import ConfigError, validate_config
from _tiny import train_config

MIX = {'shakespeare_plays': 0.5, 'python_stdlib': 0.5}
VOCAB = 500
SPECIALS = ['<|endoftext|>', '<pad>', '<s>']  # ids 0, 1, 2: EOS, PAD, BOS by their usual names


def _texts(name, data_dir, split='train'):
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  return [src[i]['text'].decode('utf-8', 'replace') for i in range(len(src))]


def _bpe(texts, specials, vocab=VOCAB) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.fixture(scope='module')
def corpus(data_dir):
  """{domain: every train document's text joined by NUL}."""
  return {n: '\0'.join(_texts(n, data_dir)) for n in MIX}


@pytest.fixture(scope='module')
def bpe(data_dir, tmp_path_factory):
  """A 500-token byte-level BPE trained on ~400 KB of both corpora, saved as <folder>/tokenizer.json."""
  plays, code = _texts('shakespeare_plays', data_dir), _texts('python_stdlib', data_dir)
  folder = tmp_path_factory.mktemp('bpe')
  _bpe(plays[:2] + code[:40], SPECIALS).save(str(folder / 'tokenizer.json'))
  return str(folder / 'tokenizer.json')


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _stream(batches):
  """The token stream the rows were cut from (rows are consecutive windows of seq_len + 1)."""
  return np.concatenate([np.concatenate([b['inputs'][:, :1], b['targets']], 1).reshape(-1) for b in batches])


def test_load_reads_the_special_tokens(bpe, tmp_path):
  tok = data.load_tokenizer(bpe)
  assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (0, 1, 2, VOCAB)
  assert tok.name == bpe and data.load_tokenizer(os.path.dirname(bpe)).name == bpe  # a folder: its tokenizer.json
  text = 'Wherefore art thou, Romeo? héllo ✓\n'
  assert tok.decode(tok.encode(text)) == text
  np.testing.assert_array_equal(tok.document(text), [2, *tok.encode(text), 0])
  # Special tokens inside a document are text, not ids: EOS appears only where the pipeline puts it.
  assert 0 not in tok.encode('x <|endoftext|> y') and tok.decode(tok.encode('<|endoftext|>')) == '<|endoftext|>'
  # A tokenizer_config.json beside it wins over the names (fields as strings or AddedToken dicts).
  folder = tmp_path / 'model'
  folder.mkdir()
  (folder / 'tokenizer.json').write_bytes(open(bpe, 'rb').read())
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': {'content': '<s>', '__type': 'AddedToken'}, 'bos_token': None}))
  (folder / 'special_tokens_map.json').write_text(json.dumps({'bos_token': '<pad>', 'pad_token': '<|endoftext|>'}))
  side = data.load_tokenizer(str(folder))
  assert (side.eos_id, side.bos_id, side.pad_id) == (2, 1, 0)
  assert side.fingerprint != tok.fingerprint  # other special ids: another token stream
  (folder / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '</nothing>'}))
  with pytest.raises(ValueError, match=r"tokenizer_config\.json names eos_token='</nothing>'"):
    data.load_tokenizer(str(folder))
  with pytest.raises(ValueError, match='no such file'):
    data.load_tokenizer(str(tmp_path / 'absent'))


def test_rows_decode_to_corpus_text(bpe, corpus, data_dir):
  tok = data.load_tokenizer(bpe)
  it = data.make_train_iter(MIX, seq_len=128, global_batch=8, seed=1, data_dir=data_dir, tokenizer=bpe,
                            vocab_size=VOCAB)
  checked = 0
  for b in _take(it, 4):
    assert b['inputs'].shape == b['targets'].shape == (8, 128) and b['inputs'].dtype == np.int32
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
    assert b['inputs'].min() >= 0 and b['targets'].max() < VOCAB
    for row, d in zip(b['inputs'], b['domain']):
      for piece in np.split(row, np.flatnonzero(row < 3)):  # cut at EOS/PAD/BOS
        text = tok.decode(piece).strip('\ufffd')  # a window may cut a multi-byte character
        if len(text) >= 16:
          assert text in corpus[list(MIX)[d]], text
          checked += 1
  assert checked >= 32


def test_documents_are_bos_text_eos(bpe, corpus, data_dir):
  """Concatenated rows are the documents' [BOS, *ids, EOS] one after another, as for bytes."""
  tok = data.load_tokenizer(bpe)
  it = data.make_train_iter({'python_stdlib': 1.0}, seq_len=1023, global_batch=16, seed=2, data_dir=data_dir,
                            tokenizer=bpe)
  stream = _stream(_take(it, 4))
  eos = np.flatnonzero(stream == tok.eos_id)
  assert len(eos) >= 3
  bos = np.flatnonzero(stream == tok.bos_id)
  assert set(bos) - {0} == set(eos + 1) - {stream.size}  # a BOS exactly after every EOS, nowhere else
  assert not (stream == tok.pad_id).any()  # packed rows hold no padding
  docs = set(corpus['python_stdlib'].split('\0'))
  for a, b in zip(eos[:-1], eos[1:]):  # each whole document between two EOS is one file's exact text
    assert tok.decode(stream[a + 2:b]) in docs
    np.testing.assert_array_equal(stream[a + 1:b + 1], tok.document(tok.decode(stream[a + 2:b])))


@pytest.mark.parametrize('mix,shards,seq_len,batch,n,m', [
    (MIX, 1, 128, 8, 5, 4),
    ({'python_stdlib': 1.0}, 2, 1023, 16, 3, 3),  # small files: resumes across document boundaries
])
def test_iterator_resumes_exactly(bpe, data_dir, mix, shards, seq_len, batch, n, m):
  kw = dict(seq_len=seq_len, global_batch=batch, seed=7, data_dir=data_dir, num_shards=shards, tokenizer=bpe)
  it = data.make_sharded_train_iter(mix, **kw)
  _take(it, n)
  blob = json.dumps(it.get_state())  # a JSON-serialisable dict, as checkpoints store it
  expected = _take(it, m)
  fresh = data.make_sharded_train_iter(mix, **kw)
  fresh.set_state(json.loads(blob))
  assert _same(_take(fresh, m), expected)
  fresh.set_state(json.loads(blob))  # restoring an iterator that already ran
  assert _same(_take(fresh, m), expected)
  # The tokenizer identifies the stream: a state is refused by a pipeline of another tokenizer.
  with pytest.raises(ValueError, match=r'data.tokenizer=another tokenizer.*data.tokenizer=bytes'):
    data.make_sharded_train_iter(mix, **{**kw, 'tokenizer': 'bytes'}).set_state(json.loads(blob))
  byte_state = data.make_sharded_train_iter(mix, **{**kw, 'tokenizer': 'bytes'}).get_state()
  with pytest.raises(ValueError, match=r'data.tokenizer=bytes.*data.tokenizer=' + re.escape(bpe)):
    fresh.set_state(byte_state)


def test_eval_batches_count_the_text_bytes(bpe, data_dir):
  tok = data.load_tokenizer(bpe)
  text = 'héllo ✓ wörld\n  def f(x):\treturn x  \n' * 3
  ids, nbytes = tok.document_bytes(text)
  np.testing.assert_array_equal(ids, tok.document(text))
  assert nbytes.sum() == len(text.encode()) and nbytes[0] == nbytes[-1] == 0
  ev = data.eval_batches('shakespeare_plays', seq_len=127, batch_size=4, num_batches=3, data_dir=data_dir,
                         tokenizer=bpe)
  assert len(ev) == 3 and ev[0]['inputs'][0, 0] == tok.bos_id
  for b in ev:
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
    decoded = [tok.decode(row) for row in b['targets']]
    assert not any('\ufffd' in t for t in decoded)
    assert b['num_tokens'] == 4 * 127 and b['num_bytes'] == sum(len(t.encode()) for t in decoded) > b['num_tokens']


def test_vocab_larger_than_the_embedding_is_refused(bpe, data_dir):
  with pytest.raises(ValueError, match=re.escape(f'data.tokenizer={bpe} has 500 tokens but model.vocab_size=259 '
                                                 'embedding rows')):
    data.make_train_iter(MIX, seq_len=8, global_batch=2, seed=0, data_dir=data_dir, tokenizer=bpe, vocab_size=259)
  c = train_config(data_dir)
  c.data.tokenizer = os.path.dirname(bpe)
  with pytest.raises(ConfigError, match='has 500 tokens but model.vocab_size=259') as err:
    validate_config(c, num_devices=1)
  assert err.value.key == 'data.tokenizer' and bpe in str(err.value)
  c.model.vocab_size = 512  # more embedding rows than tokens is fine (padded embeddings)
  validate_config(c, num_devices=1)
  c.data.tokenizer, c.model.vocab_size = 'bytes', 258
  with pytest.raises(ConfigError, match='data.tokenizer=bytes has 259 tokens but model.vocab_size=258'):
    validate_config(c, num_devices=1)
  c.data.tokenizer = str(data_dir)  # a folder without tokenizer.json
  with pytest.raises(ConfigError, match='no such file'):
    validate_config(c, num_devices=1)


def test_a_tokenizer_without_eos_is_refused_naming_the_file(tmp_path):
  path = str(tmp_path / 'tokenizer.json')
  _bpe(['to be or not to be, that is the question'] * 20, ['<pad>', '<s>'], vocab=300).save(path)
  with pytest.raises(ValueError, match=r'tokenizer: .*tokenizer\.json has no EOS token') as err:
    data.load_tokenizer(path)
  msg = str(err.value)
  assert path in msg and 'eos_token' in msg and 'tokenizer_config.json (absent)' in msg and "'</s>'" in msg
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<s>'}))  # the fix the message names
  assert data.load_tokenizer(path).eos_id == 1


# The default byte stream, as the pipeline produced it before subword tokenizers (sha256 of the
# inputs/targets/domain bytes of 4 batches of 64 x 1023, seed 0, and of 20 evaluation batches).
BYTES_TRAIN = '09052934b7a42b72e3e2aa36d365411ac460c730e7045f7504d8900bf48ab3f1'
BYTES_EVAL = 'de245b877f3ffe7a60ea4128b2da11ece7cbf08ca394b0dc4b05360877228769'


def _digest(batches):
  h = hashlib.sha256()
  for b in batches:
    for k in ('inputs', 'targets', 'domain'):
      h.update(np.ascontiguousarray(b[k]).tobytes())
  return h.hexdigest()


def test_bytes_is_the_default_and_unchanged(data_dir):
  tok = data.load_tokenizer()
  assert isinstance(tok, data.ByteTokenizer) and tok.fingerprint is None
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258) == (
      data.VOCAB_SIZE, data.PAD_ID, data.BOS_ID, data.EOS_ID)
  np.testing.assert_array_equal(tok.document('hé'), [257, 104, 195, 169, 258])
  np.testing.assert_array_equal(tok.document('hé'), data.encode('hé'))
  assert tok.encode('hé') == [104, 195, 169] and tok.decode([257, 104, 195, 169, 258]) == 'hé'
  assert lm.get_config('tiny').data.tokenizer == 'bytes'
  kw = dict(seq_len=1023, global_batch=64, seed=0, data_dir=data_dir)
  it = data.make_train_iter({'shakespeare_plays': 1.0}, **kw)
  batches = _take(it, 4)
  assert _digest(batches) == BYTES_TRAIN
  assert _same(batches, _take(data.make_train_iter({'shakespeare_plays': 1.0}, tokenizer='bytes', **kw), 4))
  assert it.get_state() == {'rows': 256, 'seed': 3405042463,  # no tokenizer entry: old states resume
                            'parts': {'shakespeare_plays': {'doc_state': {'next_index': 1}, 'pos': 98166}}}
  ev = data.eval_batches('shakespeare_plays', seq_len=1023, batch_size=16, num_batches=20, data_dir=data_dir)
  assert _digest(ev) == BYTES_EVAL and sum(b['num_bytes'] for b in ev) == 327356


def test_vocab_error_of_a_staged_config_names_the_tokenizer_not_a_stage(data_dir):
  """The vocab check runs after the stages are checked: its message must name data.tokenizer's own
  value (a staged config once printed the last stage's dict there)."""
  from moegrow.configs import grow
  c = grow.get_config("tiny")
  c.data.data_dir = data_dir
  c.model.vocab_size = 258
  with pytest.raises(ConfigError) as err:
    validate_config(c, num_devices=1)
  assert err.value.key == "data.tokenizer"
  assert str(err.value).startswith("config: data.tokenizer='bytes' is not allowed: data.tokenizer=bytes has 259 tokens")
  assert "moe8" not in str(err.value) and "steps" not in str(err.value)
