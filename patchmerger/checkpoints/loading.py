"""Reading weights (a public `.npz` or one of our runs) and fitting them to a model.

Loading is strict: every parameter of the model must come from the checkpoint, except
- the parameters of token reducers that the checkpoint lacks (a merger inserted into a
  plain pretrained ViT starts from its initialisation),
- a head of another size (re-initialised to zeros, as ViT fine-tuning does),
- keys matching one of `dont_load`'s regexes.
Anything else would train a partly random model without anyone noticing, so it is
refused, unless `strict=False`. Sources are only ever read.
"""
import dataclasses
import logging
import re
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
from etils import epath
import jax.numpy as jnp
import numpy as np

from patchmerger.checkpoints import layouts, manager as manager_lib
from patchmerger.errors import CheckpointError, CheckpointNotFoundError

Flat = dict[str, np.ndarray]
POSEMB = layouts.POSEMB
HEAD = ('head/kernel', 'head/bias')
# Parameters a plain checkpoint cannot have: they start from their initialisation.
REDUCER_KEY = re.compile(r'^Transformer/(patchmerger|tokenlearner)_\d+/')


class PretrainedMismatchError(CheckpointError):
  """Pretrained weights do not fit the model (beyond what adaptation handles)."""


def flatten(params: Any) -> Flat:
  return {'/'.join(k): np.asarray(v)
          for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


def check_source(path: str) -> None:
  """One-line errors for an `init_from` that cannot be a checkpoint; reads nothing else."""
  if not epath.Path(path).exists():
    raise CheckpointNotFoundError(f'init_from {path} does not exist.')
  if epath.Path(path).is_file():
    if not path.endswith('.npz'):
      raise CheckpointError(f'init_from {path} is a file but not a .npz; give a public-layout '
                            '.npz or one of our run directories.')
    return
  if not manager_lib.steps(path):
    raise CheckpointNotFoundError(f'init_from {path} is a directory without checkpoints '
                                  f'({epath.Path(path) / "checkpoints"} holds no finished step).')


def load_npz(path: str) -> Flat:
  """The arrays of a `.npz` as they are stored (any layout); never unpickles."""
  check_source(path)
  try:
    with epath.Path(path).open('rb') as f, np.load(f, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:  # Not a zip, truncated, or pickled objects.
    raise CheckpointError(f'init_from {path} is not a readable .npz: {e}') from None


def load_orbax_params(workdir: str, step: Optional[int] = None) -> Flat:
  """The parameters of one of our runs (its latest checkpoint by default), read-only."""
  check_source(workdir)
  return flatten(manager_lib.read_params(workdir, step))


def load(source: str) -> tuple[Flat, layouts.Layout]:
  """Weights from a `.npz` (any known layout) or one of our run directories, in our
  layout, with the layout that was found."""
  check_source(source)
  if epath.Path(source).is_file():
    return layouts.to_canonical(load_npz(source))
  return layouts.to_canonical(load_orbax_params(source))  # Scanned runs are unstacked.


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


@dataclasses.dataclass
class Report:
  """What loading did to each model parameter (and to unused checkpoint keys)."""
  layout: str = 'ours'
  loaded: list = dataclasses.field(default_factory=list)
  resized: list = dataclasses.field(default_factory=list)
  reinitialised: list = dataclasses.field(default_factory=list)  # allowed: head, dont_load
  new: list = dataclasses.field(default_factory=list)            # allowed: reducers
  missing: list = dataclasses.field(default_factory=list)        # not allowed: at init
  dropped: list = dataclasses.field(default_factory=list)        # in checkpoint, unused

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def log(self) -> None:
    logging.info('Pretrained weights (%s): %d loaded, %d resized %s, %d re-initialised %s, '
                 '%d new %s, %d dropped %s', self.layout, len(self.loaded), len(self.resized),
                 self.resized, len(self.reinitialised), self.reinitialised, len(self.new),
                 self.new, len(self.dropped), self.dropped)


def adapt(loaded: Flat, init_params: Any, has_cls: bool, dont_load: Sequence[str] = (),
          strict: bool = True, layout: str = 'ours') -> tuple[dict, Report]:
  """Fits `loaded` (our layout) onto the model whose fresh parameters are `init_params`.

  Position embeddings of another grid are resized; a head of another size and keys
  matching `dont_load` keep their initialisation (the head zeros); reducer parameters the
  checkpoint lacks keep theirs; keys the model lacks (e.g. `pre_logits`) are dropped.
  Any other parameter the checkpoint lacks is refused (PretrainedMismatchError) unless
  `strict=False`; a shape that cannot be adapted is always refused.
  """
  target = flatten(init_params)
  runs = layouts.scanned_runs(target)  # A scanned model is fitted block by block.
  target = layouts.unstack_runs(target)
  skipped = {k for k in target if any(re.fullmatch(p, k) for p in dont_load)}
  report = Report(layout=layout, dropped=sorted(set(loaded) - set(target)))
  out = {}
  for key, fresh in target.items():
    value = loaded.get(key)
    if key in skipped:
      out[key] = fresh
      report.reinitialised.append(key)
    elif value is None:
      out[key] = fresh
      (report.new if REDUCER_KEY.match(key) else report.missing).append(key)
    elif value.shape == fresh.shape:
      out[key] = value.astype(fresh.dtype)
      report.loaded.append(key)
    elif key == POSEMB and value.ndim == 3 and value.shape[-1] == fresh.shape[-1]:
      out[key] = resize_posemb(value, fresh.shape[1], has_cls).astype(fresh.dtype)
      report.resized.append(key)
    elif key in HEAD:
      out[key] = np.zeros_like(fresh)
      report.reinitialised.append(key)
    else:
      raise PretrainedMismatchError(
          f'Pretrained weights ({layout}) do not fit this model: {key} has shape '
          f'{value.shape} in the checkpoint but {fresh.shape} in the model.')
  if not report.loaded:
    raise PretrainedMismatchError(
        f'Pretrained weights ({layout}) share no parameter with this model (first checkpoint '
        f'key: {next(iter(loaded), None)}, first model key: {next(iter(target), None)}).')
  if report.missing and strict:
    names = ', '.join(report.missing[:3]) + (', ...' if len(report.missing) > 3 else '')
    raise PretrainedMismatchError(
        f'Pretrained weights ({layout}) would leave {len(report.missing)} of {len(target)} model '
        f'parameters at their initialisation ({names}). List them in init_dont_load, or set '
        'init_strict=False to allow it.')
  return unflatten(layouts.stack_runs(out, runs)), report


def load_and_adapt(source: str, init_params: Any, has_cls: bool, dont_load: Sequence[str] = (),
                   strict: bool = True) -> tuple[dict, Report]:
  """`source` (any layout `load` reads) fitted onto `init_params` by `adapt`; logs what
  loading did."""
  flat, layout = load(source)
  params, report = adapt(flat, init_params, has_cls=has_cls, dont_load=dont_load,
                         strict=strict, layout=layout.describe())
  report.log()
  return params, report
