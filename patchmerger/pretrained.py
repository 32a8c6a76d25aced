"""Public-layout `.npz` weights and starting a run from a pretrained checkpoint.

The `.npz` layout is google-research/vision_transformer's: one array per
parameter, keys joined by '/' (`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`,
`Transformer/posembed_input/pos_embedding`, `cls`, `embedding/kernel`, `head/kernel`).
big_vision's variants are read too: a top-level `pos_embedding`, and blocks stacked
along a leading axis under `Transformer/encoderblock/` (its `scan` layout).
`np.load(..., allow_pickle=False)` throughout: weights are plain arrays.
"""
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

Flat = dict[str, np.ndarray]
POSEMB = 'Transformer/posembed_input/pos_embedding'
HEAD = ('head/kernel', 'head/bias')


class PretrainedMismatchError(ValueError):
  """Pretrained weights do not fit the model (beyond what adaptation handles)."""


def flatten(params: Any) -> Flat:
  return {'/'.join(k): np.asarray(v)
          for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def export_npz(params: Any, path: str) -> None:
  """Writes `params` in the public `.npz` layout."""
  with open(path, 'wb') as f:
    np.savez(f, **flatten(jax.device_get(params)))


def _from_big_vision(flat: Flat) -> Flat:
  """big_vision spellings -> the vision_transformer layout of our model."""
  out = {}
  for key, value in flat.items():
    key = key.removeprefix('params/')
    if key == 'pos_embedding':
      key = POSEMB
    if key.startswith('Transformer/encoderblock/'):  # Scanned: [depth, ...] per leaf.
      rest = key.removeprefix('Transformer/encoderblock/')
      for i, block in enumerate(value):
        out[f'Transformer/encoderblock_{i}/{rest}'] = block
      continue
    out[key] = value
  return out


def load_npz(path: str) -> Flat:
  if not os.path.exists(path):
    raise FileNotFoundError(f'No pretrained weights at {path}')
  with np.load(path, allow_pickle=False) as data:
    return _from_big_vision({k: data[k] for k in data.files})


def load_orbax_params(workdir: str, step: Optional[int] = None) -> Flat:
  """The parameters of one of our runs (its latest checkpoint by default)."""
  import orbax.checkpoint as ocp
  from patchmerger.training import checkpoint
  manager = checkpoint.make_manager(workdir, 1)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {checkpoint.checkpoint_dir(workdir)}')
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  return flatten(restored['params'])


def load(source: str) -> Flat:
  """Weights from a `.npz` file or from one of our run directories."""
  return load_npz(source) if source.endswith('.npz') else load_orbax_params(source)


def resize_posemb(posemb: np.ndarray, num_tokens: int, has_cls: bool) -> np.ndarray:
  """[1, (cls +) g*g, D] -> [1, (cls +) h*h, D] by bilinear 2-D interpolation of the
  grid; the class token's embedding is kept apart, unchanged."""
  extra = 1 if has_cls else 0
  cls, grid = posemb[:, :extra], posemb[:, extra:]
  old, new = int(round(np.sqrt(grid.shape[1]))), int(round(np.sqrt(num_tokens - extra)))
  if old * old != grid.shape[1] or new * new != num_tokens - extra:
    raise PretrainedMismatchError(f'{POSEMB}: cannot resize a non-square grid '
                                  f'({grid.shape[1]} -> {num_tokens - extra} tokens)')
  if old != new:
    grid = grid.reshape(1, old, old, -1)
    grid = jax.image.resize(jnp.asarray(grid), (1, new, new, grid.shape[-1]), 'bilinear')
    grid = np.asarray(grid).reshape(1, new * new, -1)
  return np.concatenate([cls, grid], axis=1)


def adapt(loaded: Flat, init_params: Any, has_cls: bool,
          dont_load: Sequence[str] = ()) -> tuple[dict, dict]:
  """Fits `loaded` onto the model whose fresh parameters are `init_params`.

  - position embeddings of another grid are resized;
  - a head of another size is re-initialised to zeros (as ViT fine-tuning does);
  - parameters the checkpoint lacks (e.g. an inserted PatchMerger) keep their init;
  - parameters the model lacks (e.g. `pre_logits`) are dropped;
  - keys matching a `dont_load` regex (e.g. 'head/.*' for a new task) keep their init.
  Any other shape difference raises PretrainedMismatchError naming the key.
  Returns (params, report) where report maps loaded/resized/new/dropped to keys.
  """
  target = flatten(init_params)
  skipped = {k for k in loaded if any(re.fullmatch(p, k) for p in dont_load)}
  loaded = {k: v for k, v in loaded.items() if k not in skipped}
  report = {'loaded': [], 'resized': [], 'new': [],
            'dropped': sorted((set(loaded) | skipped) - set(target))}
  out = {}
  for key, fresh in target.items():
    if key not in loaded:
      out[key] = fresh
      report['new'].append(key)
      continue
    value = loaded[key]
    if value.shape == fresh.shape:
      out[key] = value.astype(fresh.dtype)
      report['loaded'].append(key)
    elif key == POSEMB and value.shape[-1] == fresh.shape[-1]:
      out[key] = resize_posemb(value, fresh.shape[1], has_cls).astype(fresh.dtype)
      report['resized'].append(key)
    elif key in HEAD:
      out[key] = np.zeros_like(fresh)
      report['new'].append(key)
    else:
      raise PretrainedMismatchError(
          f'Pretrained weights do not fit this model: {key} has shape {value.shape} in the '
          f'checkpoint but {fresh.shape} in the model.')
  if not report['loaded']:
    raise PretrainedMismatchError('Pretrained weights share no parameter with this model '
                                  f'(first checkpoint key: {next(iter(loaded), None)}).')
  return unflatten(out), report


def log_report(report: Mapping[str, list]) -> None:
  logging.info('Pretrained weights: %d loaded, %d resized %s, %d new %s, %d dropped %s',
               len(report['loaded']), len(report['resized']), report['resized'],
               len(report['new']), report['new'], len(report['dropped']), report['dropped'])
