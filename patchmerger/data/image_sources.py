"""The classes of an image dataset on disk and their images, read and cleaned.

`imagenet21k`: a directory of one tar per class named by WordNet id (`n01440764.tar`,
as in the fall11 and winter21 releases) or one folder per class; all of it is the
split `full`. `folder:PATH`: PATH/<split>/<class>/*.{jpg,jpeg,png}.
"""
import dataclasses
import hashlib
import io
import os
import re
import tarfile
from typing import Iterator, Optional

from patchmerger.errors import ConfigError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


@dataclasses.dataclass(frozen=True)
class ClassSource:
  """One class of one split: a tar file or a folder of images."""
  split: str
  label: str
  path: str
  size: int  # bytes on disk, for planning


def folder_dataset_name(path: str) -> str:
  """A TFDS name for an image folder: folder_<basename>_<hash of the path>."""
  path = os.path.abspath(os.path.expanduser(path))
  base = re.sub(r'[^a-z0-9]+', '_', os.path.basename(path.rstrip('/')).lower()).strip('_')
  digest = hashlib.blake2b(path.encode(), digest_size=4).hexdigest()
  return f'folder_{base}_{digest}' if base else f'folder_{digest}'


def _dir_size(path: str) -> int:
  return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def list_classes(root: str, split: str) -> list[ClassSource]:
  """Per-class tars (`<label>.tar`) and per-class folders directly under `root`."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Source directory {root} does not exist.')
  sources = []
  for entry in sorted(os.scandir(root), key=lambda e: e.name):
    if entry.is_file() and entry.name.endswith('.tar'):
      sources.append(ClassSource(split, entry.name[:-4], entry.path, entry.stat().st_size))
    elif entry.is_dir():
      sources.append(ClassSource(split, entry.name, entry.path, _dir_size(entry.path)))
  if not sources:
    raise FileNotFoundError(f'{root} holds no per-class .tar files or class folders.')
  return sources


def list_sources(dataset: str, source: Optional[str]) -> tuple[str, list[ClassSource]]:
  """(TFDS name, classes of every split) for `imagenet21k` or `folder:PATH`."""
  if dataset.startswith('folder:'):
    root = dataset.split(':', 1)[1]
    if not os.path.isdir(root):
      raise FileNotFoundError(f'Image folder {root} does not exist.')
    splits = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not splits:
      raise FileNotFoundError(f'{root} has no split folders (expected {root}/train/<class>/...).')
    return folder_dataset_name(root), [c for s in splits
                                       for c in list_classes(os.path.join(root, s), s)]
  if dataset == 'imagenet21k':
    if not source:
      raise ConfigError('--source=DIR is required for imagenet21k (per-class tars or folders).')
    return 'imagenet21k', list_classes(source, 'full')
  raise ConfigError(f'Unknown --dataset {dataset!r}: expected imagenet21k or folder:PATH.')


def read_class_list(path: str) -> list[str]:
  with open(path) as f:
    return [line.split()[0] for line in f if line.strip()]


def iter_images(source: ClassSource) -> Iterator[tuple[str, bytes]]:
  """(file name, bytes) of a class, one at a time; tars are read as a stream."""
  if source.path.endswith('.tar') and os.path.isfile(source.path):
    with tarfile.open(source.path, mode='r|*') as tar:  # Streaming: no member index kept.
      for member in tar:
        if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
          yield os.path.basename(member.name), tar.extractfile(member).read()
  else:
    for name in sorted(os.listdir(source.path)):
      if name.lower().endswith(IMAGE_SUFFIXES):
        with open(os.path.join(source.path, name), 'rb') as f:
          yield name, f.read()


def clean_image(data: bytes, keep_png: bool) -> tuple[Optional[bytes], str]:
  """(bytes to store, outcome): JPEGs in RGB or grayscale (and PNGs if `keep_png`)
  as they are, other images re-encoded as JPEG, unreadable ones None."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data)) as image:
      kind, mode = image.format, image.mode
      if kind == 'JPEG':  # Decoding at 1/8 scale is cheap and finds truncated data.
        image.draft('RGB', (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
  except Exception:  # PIL raises many types for broken files.
    return None, 'skipped_corrupt'
  if kind == 'JPEG' and mode in ('RGB', 'L'):
    return data, 'ok'
  if kind == 'PNG' and keep_png:
    return data, 'ok'
  with Image.open(io.BytesIO(data)) as image:
    out = io.BytesIO()
    image.convert('RGB').save(out, format='JPEG', quality=95)
  outcome = {('JPEG', 'CMYK'): 'reencoded_cmyk_jpeg', ('PNG', None): 'reencoded_png'}.get(
      (kind, mode if kind == 'JPEG' else None), 'reencoded_other')
  return out.getvalue(), outcome
