"""Reading weights (a public `.npz` or one of our runs) and fitting them to a model.

Loading is strict: every parameter of the model must come from the checkpoint, except
- the parameters of token reducers that the checkpoint lacks (a merger inserted into a
  plain pretrained ViT starts from its initialisation),
- a head of another size (re-initialised to zeros, as ViT fine-tuning does),
- keys matching one of `dont_load`'s regexes,
- with `upcycle`, the routers of MoE blocks whose experts start from the checkpoint's
  dense MLP of that block (each expert a copy of `MlpBlock_3`: "sparse upcycling").
Anything else would train a partly random model without anyone noticing, so it is
refused, unless `strict=False`; so is a checkpoint parameter inside one of the model's
blocks that the model has no place for (it would be dropped). Sources are only ever read.
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
BLOCK_KEY = re.compile(r'^(Transformer/encoderblock_\d+)/')
DENSE_MLP, EXPERTS = 'MlpBlock_3', 'Moe/Mlp'


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
  upcycled: list = dataclasses.field(default_factory=list)       # blocks: experts <- dense MLP

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def log(self) -> None:
    logging.info('Pretrained weights (%s): %d loaded, %d resized %s, %d re-initialised %s, '
                 '%d new %s, %d dropped %s, %d blocks upcycled %s', self.layout,
                 len(self.loaded), len(self.resized), self.resized, len(self.reinitialised),
                 self.reinitialised, len(self.new), self.new, len(self.dropped), self.dropped,
                 len(self.upcycled), self.upcycled)


def _block_number(block: str) -> int:
  return int(block.rsplit('_', 1)[1])


def _blocks(keys) -> str:
  """'encoderblock_1, encoderblock_3' for block paths or keys inside blocks."""
  names = sorted({BLOCK_KEY.match(k + '/').group(1) for k in keys}, key=_block_number)
  return ', '.join(b.removeprefix('Transformer/') for b in names)


def dense_blocks_for_experts(loaded: Flat, target: Flat) -> list[str]:
  """The model's MoE blocks (`Transformer/encoderblock_N`) for which the checkpoint holds
  a dense MLP and no experts."""
  moe = {BLOCK_KEY.match(k).group(1) for k in target if f'/{EXPERTS}/' in k}
  return sorted((b for b in moe if any(k.startswith(f'{b}/{DENSE_MLP}/') for k in loaded)
                 and not any(k.startswith(f'{b}/Moe/') for k in loaded)), key=_block_number)


def upcycled(loaded: Flat, target: Flat, blocks: Sequence[str]) -> Flat:
  """`loaded` with the dense MLP of each of `blocks` copied into every expert
  (`Moe/Mlp/...` [E, ...], E from the model) in place of `MlpBlock_3`; routers absent."""
  out = {k: v for k, v in loaded.items() if not k.startswith(
      tuple(f'{b}/{DENSE_MLP}/' for b in blocks))}
  for block in blocks:
    for key in (k for k in target if k.startswith(f'{block}/{EXPERTS}/')):
      dense = loaded.get(key.replace(f'/{EXPERTS}/', f'/{DENSE_MLP}/'))
      if dense is not None:
        out[key] = np.repeat(np.asarray(dense)[None], target[key].shape[0], axis=0)
  return out


def _experts_hint(key: str, value: np.ndarray, target: Flat) -> str:
  """Why an MoE parameter does not fit: the numbers of experts, when they differ."""
  block = BLOCK_KEY.match(key)
  if not block or '/Moe/' not in key:
    return ''
  experts = target.get(f'{block.group(1)}/{EXPERTS}/Dense_0/kernel')
  theirs = {'Router/dense/kernel': -1, 'Router/mu': 1}.get(key.split('/Moe/', 1)[1],
                                                           0 if f'/{EXPERTS}/' in key else None)
  if experts is None or theirs is None or value.ndim <= abs(theirs):
    return ''
  if value.shape[theirs] == experts.shape[0]:
    return ' (the same number of experts: another width, MLP size or number of slots)'
  return (f' ({_blocks([key])} has {value.shape[theirs]} experts in the checkpoint and '
          f'{experts.shape[0]} in the model: set model.moe.num_experts to the checkpoint\'s)')


def adapt(loaded: Flat, init_params: Any, has_cls: bool, dont_load: Sequence[str] = (),
          strict: bool = True, layout: str = 'ours',
          upcycle: bool = False) -> tuple[dict, Report]:
  """Fits `loaded` (our layout) onto the model whose fresh parameters are `init_params`.

  Position embeddings of another grid are resized; a head of another size and keys
  matching `dont_load` keep their initialisation (the head zeros); reducer parameters the
  checkpoint lacks keep theirs; keys the model lacks (e.g. `pre_logits`) are dropped.
  Any other parameter the checkpoint lacks, and a checkpoint parameter inside one of the
  model's blocks that the model lacks, are refused (PretrainedMismatchError) unless
  `strict=False`; a shape that cannot be adapted is always refused. A dense checkpoint
  (`MlpBlock_3`) for MoE blocks is refused in one line naming them, unless `upcycle`:
  then every expert starts as a copy of the block's dense MLP and the router from its
  initialisation (`report.upcycled` lists the blocks).
  """
  target = flatten(init_params)
  runs = layouts.scanned_runs(target)  # A scanned model is fitted block by block.
  target = layouts.unstack_runs(target)
  skipped = {k for k in target if any(re.fullmatch(p, k) for p in dont_load)}
  dense = dense_blocks_for_experts(loaded, target)
  if upcycle and dense:
    loaded = upcycled(loaded, target, dense)
  report = Report(layout=layout, dropped=sorted(set(loaded) - set(target)),
                  upcycled=dense if upcycle else [])
  router = tuple(f'{b}/Moe/Router/' for b in report.upcycled)
  out = {}
  for key, fresh in target.items():
    value = loaded.get(key)
    if key in skipped:
      out[key] = fresh
      report.reinitialised.append(key)
    elif value is None:
      out[key] = fresh
      allowed = REDUCER_KEY.match(key) or key.startswith(router)
      (report.new if allowed else report.missing).append(key)
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
          f'{value.shape} in the checkpoint but {fresh.shape} in the model'
          f'{_experts_hint(key, value, target)}.')
  if not report.loaded:
    raise PretrainedMismatchError(
        f'Pretrained weights ({layout}) share no parameter with this model (first checkpoint '
        f'key: {next(iter(loaded), None)}, first model key: {next(iter(target), None)}).')
  if dense and not upcycle and strict:
    raise PretrainedMismatchError(
        f'Pretrained weights ({layout}) hold a dense MLP ({DENSE_MLP}) in {_blocks(dense)}, '
        'where this model has experts (Moe): set init_upcycle=True to start every expert as '
        'a copy of it (sparse upcycling), or load a checkpoint with experts.')
  if report.missing and strict:
    names = ', '.join(report.missing[:3]) + (', ...' if len(report.missing) > 3 else '')
    raise PretrainedMismatchError(
        f'Pretrained weights ({layout}) would leave {len(report.missing)} of {len(target)} model '
        f'parameters at their initialisation ({names}). List them in init_dont_load, or set '
        'init_strict=False to allow it.')
  blocks = {m.group(1) for m in map(BLOCK_KEY.match, target) if m}
  unused = [k for k in report.dropped if (m := BLOCK_KEY.match(k)) and m.group(1) in blocks]
  if unused and strict:
    names = ', '.join(unused[:3]) + (', ...' if len(unused) > 3 else '')
    raise PretrainedMismatchError(
        f'Pretrained weights ({layout}) hold {len(unused)} parameters inside this model\'s '
        f'blocks that the model has no place for ({names}): its blocks are built otherwise. '
        'Set init_strict=False to drop them.')
  return unflatten(layouts.stack_runs(out, runs)), report


def load_and_adapt(source: str, init_params: Any, has_cls: bool, dont_load: Sequence[str] = (),
                   strict: bool = True, upcycle: bool = False) -> tuple[dict, Report]:
  """`source` (any layout `load` reads) fitted onto `init_params` by `adapt`; logs what
  loading did."""
  flat, layout = load(source)
  params, report = adapt(flat, init_params, has_cls=has_cls, dont_load=dont_load,
                         strict=strict, layout=layout.describe(), upcycle=upcycle)
  report.log()
  return params, report
