"""Tokenizers of the data pipeline: UTF-8 bytes (the default) or a Hugging Face ``tokenizer.json``.

``load(spec)`` takes ``data.tokenizer``: ``'bytes'``, the path of a ``tokenizer.json``, or a folder
holding one (an imported HF model). Both kinds share one small interface: ``encode(text)`` (plain
ids, no special tokens), ``decode(ids)``, ``document(text)`` (the ids of one training document:
``[BOS, *encode(text), EOS]``), ``document_bytes(text)`` (with the text bytes each id stands for,
for bits/byte), ``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``, ``name`` and ``fingerprint``
(what identifies the token stream in an iterator state; None for bytes). ``check_vocab`` refuses a
tokenizer with more ids than the model's embedding rows.

Special ids of a ``tokenizer.json``: the ``eos_token`` / ``bos_token`` / ``pad_token`` fields of a
``tokenizer_config.json``, then of a ``special_tokens_map.json`` beside it, else the first added
token of the file with a usual name (``EOS_NAMES`` ...). EOS is required; BOS is optional (no BOS,
or BOS == EOS as in GPT-2: documents are ``[*ids, EOS]``, the previous EOS marks the start); PAD
falls back to EOS (packed training and evaluation rows hold no padding).
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Any

import numpy as np
import tokenizers

# ------------------------------------------------------------------ bytes
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
  """Decodes byte-token ids to text, dropping special ids (utf-8, 'replace')."""
  ids = np.asarray(ids).reshape(-1)
  return bytes(ids[ids < 256].astype(np.uint8)).decode('utf-8', 'replace')


class ByteTokenizer:
  """UTF-8 bytes: ids 0..255 are the bytes, then PAD=256, BOS=257, EOS=258 (259 ids)."""

  name = 'bytes'
  vocab_size = VOCAB_SIZE
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  fingerprint = None  # the original stream: iterator states carry no tokenizer entry

  def encode(self, text: bytes | str) -> list[int]:
    """The UTF-8 bytes of ``text`` (no BOS/EOS)."""
    return list(text.encode('utf-8') if isinstance(text, str) else bytes(text))

  def decode(self, ids) -> str:
    """Text of ``ids``, special ids dropped."""
    return decode(ids)

  def document(self, text: bytes | str) -> np.ndarray:
    """int32 ``[BOS, *bytes, EOS]``."""
    return encode(text)

  def document_bytes(self, text: bytes | str) -> tuple[np.ndarray, np.ndarray]:
    """``document(text)`` and the text bytes each id stands for (1, or 0 for BOS/EOS)."""
    ids = encode(text)
    return ids, (ids < 256).astype(np.int32)


# ------------------------------------------------------------------ tokenizer.json
EOS_NAMES = ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '<|eos|>', '<|im_end|>', '<|eot_id|>', '<|end|>')
BOS_NAMES = ('<s>', '<|begin_of_text|>', '<bos>', '<|bos|>', '<|startoftext|>')
PAD_NAMES = ('<pad>', '<|pad|>', '[PAD]', '<|padding|>')
SIDE_FILES = ('tokenizer_config.json', 'special_tokens_map.json')  # checked in this order


def resolve(spec: str) -> str:
  """The ``tokenizer.json`` a ``data.tokenizer`` path names (a folder: its ``tokenizer.json``)."""
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isdir(path):
    path = os.path.join(path, 'tokenizer.json')
  if not os.path.isfile(path):
    raise ValueError(f"data.tokenizer={spec!r}: no such file {path} (give 'bytes', a tokenizer.json, or a "
                     'folder holding one)')
  return path


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'tokenizer: cannot read {path} as JSON ({e})') from e


def _token_text(value) -> str | None:
  """A special-token field's text: a string, or an AddedToken dict {'content': ...}; None if unset."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) and value else None


class SubwordTokenizer:
  """A Hugging Face ``tokenizers.Tokenizer`` read from a ``tokenizer.json`` (see the module doc).

  Special tokens inside a document's text are encoded as plain text, so EOS/BOS ids appear only
  where the pipeline puts them; no post-processor template is applied (``document`` adds BOS/EOS).
  """

  def __init__(self, path: str):
    self.name = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library's parse errors, re-raised naming the file
      raise ValueError(f'tokenizer: {path} is not a valid tokenizer.json ({type(e).__name__}: {str(e)[:300]})') from e
    self._tok.encode_special_tokens = True
    vocab = self._tok.get_vocab(with_added_tokens=True)
    # Ids run up to the largest one even where the vocab has holes: every id needs an embedding row.
    self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    ids = self._special_ids(path)
    self.eos_id, self.bos_id = ids['eos'], ids['bos']
    self.pad_id = ids['pad'] if ids['pad'] is not None else self.eos_id
    self._prefix = [] if self.bos_id in (None, self.eos_id) else [self.bos_id]
    with open(path, 'rb') as f:  # the file's content and the special ids identify the stream
      self.fingerprint = zlib.crc32(json.dumps([self.eos_id, self.bos_id, self.pad_id]).encode(), zlib.crc32(f.read()))

  def _special_ids(self, path: str) -> dict[str, int | None]:
    """{'eos', 'bos', 'pad'}: id or None, from the side files, else the added tokens' usual names."""
    folder, out, looked = os.path.dirname(path), {}, []
    for side in SIDE_FILES:
      side_path = os.path.join(folder, side)
      if not os.path.isfile(side_path):
        looked.append(f'{side_path} (absent)')
        continue
      looked.append(side_path)
      fields = _read_json(side_path)
      for role in ('eos', 'bos', 'pad'):
        text = _token_text(fields.get(f'{role}_token')) if isinstance(fields, dict) else None
        if role in out or text is None:
          continue
        out[role] = self._tok.token_to_id(text)
        if out[role] is None:
          raise ValueError(f'tokenizer: {side_path} names {role}_token={text!r}, which is not a token of {path}')
    names = {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
    for role, usual in (('eos', EOS_NAMES), ('bos', BOS_NAMES), ('pad', PAD_NAMES)):
      if role not in out:
        out[role] = next((names[n] for n in usual if n in names), None)
    if out['eos'] is None:
      raise ValueError(f'tokenizer: {path} has no EOS token: looked at the eos_token field of '
                       f'{", ".join(looked)}, and at the added_tokens of {path} for one of {list(EOS_NAMES)}. '
                       'Add a tokenizer_config.json with "eos_token" beside it, or such an added token.')
    return out

  def encode(self, text: bytes | str) -> list[int]:
    """Token ids of ``text`` (bytes are read as UTF-8, bad bytes replaced), no special tokens."""
    return self._tok.encode(_str(text), add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Text of ``ids``, special tokens dropped."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

  def document(self, text: bytes | str) -> np.ndarray:
    """int32 ``[BOS, *encode(text), EOS]`` (no BOS when the tokenizer has none or it is EOS)."""
    return np.asarray(self._prefix + self.encode(text) + [self.eos_id], np.int32)

  def document_bytes(self, text: bytes | str) -> tuple[np.ndarray, np.ndarray]:
    """``document(text)`` and the UTF-8 bytes of text each id stands for (0 for BOS/EOS).

    From the tokens' character offsets: a token counts the characters from the previous token's
    end to its own (so the counts sum to the text's bytes; tokens sharing a character count it once).
    """
    text = _str(text)
    enc = self._tok.encode(text, add_special_tokens=False)
    code = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    before = np.concatenate([[0], np.cumsum(1 + (code >= 0x80) + (code >= 0x800) + (code >= 0x10000))])
    counts = np.zeros(len(enc.ids), np.int64)
    if enc.ids:
      ends = np.maximum.accumulate(np.array([e for _, e in enc.offsets], np.int64))
      counts = np.diff(before[ends], prepend=0)
      counts[-1] += before[-1] - before[ends[-1]]  # text after the last token's end
    pad = np.zeros(len(self._prefix), np.int64)
    return (np.asarray(self._prefix + enc.ids + [self.eos_id], np.int32),
            np.concatenate([pad, counts, [0]]).astype(np.int32))


def _str(text: bytes | str) -> str:
  return text if isinstance(text, str) else bytes(text).decode('utf-8', 'replace')


Tokenizer = ByteTokenizer | SubwordTokenizer  # what ``load`` returns


def load(spec: str | Tokenizer = 'bytes') -> Tokenizer:
  """The tokenizer ``data.tokenizer`` names: ``'bytes'``, a ``tokenizer.json`` or a folder holding
  one (a tokenizer object is returned as it is). ValueError naming the file when it cannot be used."""
  if isinstance(spec, Tokenizer):
    return spec
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"data.tokenizer={spec!r}: expected 'bytes' or the path of a tokenizer.json")
  return ByteTokenizer() if spec == 'bytes' else SubwordTokenizer(resolve(spec))


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
  """ValueError when ``tok`` has more ids than the model's ``vocab_size`` embedding rows (fewer is
  fine: the extra rows are never read, as in HF models whose embeddings are padded)."""
  if tok.vocab_size > vocab_size:
    raise ValueError(f'data.tokenizer={tok.name} has {tok.vocab_size} tokens but model.vocab_size={vocab_size} '
                     f'embedding rows; use model.vocab_size >= {tok.vocab_size} or a smaller tokenizer')
