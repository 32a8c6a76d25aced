"""Sweeps: the cross product of config overrides, one run per sub-workdir.

Every run goes through `loop.train_and_evaluate`, the code path of `train.py`; a finished run
leaves `result.json` in its sub-workdir, so running the same sweep again skips it
and resumes any unfinished one from its checkpoint. `sweep.py` is its command line.
"""
import ast
import copy
import csv
import importlib.util
import itertools
import json
import os
import re
import shlex
import time
import types
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from patchmerger import config_renames
from patchmerger.errors import ConfigError, UnknownKeyError

Overrides = dict[str, Any]
RESULT_FILE = 'result.json'
COLUMNS = ('test/accuracy', 'gflops_per_image', 'train/images_per_sec', 'wall_s', 'step')


def _field_type(config: ml_collections.ConfigDict, key: str) -> type:
  """The declared type of dotted `key`; UnknownKeyError names the unknown part (or the
  key's new name, when it moved)."""
  node, parts = config, key.split('.')
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      if config_renames.renamed_key(key):
        raise UnknownKeyError(config_renames.renamed_key(key))
      raise UnknownKeyError(f'Unknown sweep key {key!r}: {".".join(parts[:depth + 1])!r} is not in '
                            'the config.')
    if depth == len(parts) - 1:
      return node.get_type(part)
    node = node[part]


def typed_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
  """`text` as a value of `key`'s type: '8' -> 8 for ints, 'Ti/4' stays a str."""
  kind = _field_type(config, key)
  if kind is str:
    return text
  if kind is bool:
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ConfigError(f'Sweep value {text!r} for {key} is not a bool.')
    return text.lower() in ('true', '1')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f'Sweep value {text!r} for {key} is not a {kind.__name__}.') from None
  if kind is float and isinstance(value, int):
    value = float(value)
  if kind is tuple and isinstance(value, list):
    value = tuple(value)
  if not isinstance(value, kind):
    raise ConfigError(f'Sweep value {text!r} for {key} is not a {kind.__name__}.')
  return value


ARG_PREFIX = 'arg.'  # `arg.merger=none,8` sweeps the config's arg string.


def parse_sweeps(config: ml_collections.ConfigDict, specs: Sequence[str]) -> list[Overrides]:
  """['a.b=1,2', 'c=x,y'] -> the cross product as override dicts, typed and checked.
  Keys `arg.NAME` stay strings: they change NAME in the config's arg string."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition('=')
    key = key.strip()
    texts = [v.strip() for v in values.split(',') if v.strip()] if sep else []
    if not key or not texts:
      raise ConfigError(f'Bad sweep {spec!r}: expected KEY=VALUE,VALUE,... with at least '
                        'one value.')
    if key.startswith(ARG_PREFIX):
      axes.append([(key, text) for text in texts])
    else:
      axes.append([(key, typed_value(config, key, text)) for text in texts])
  return [dict(combination) for combination in itertools.product(*axes)]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Overrides
                    ) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    if key.startswith(ARG_PREFIX):
      continue  # Already in the arg string the config was built from.
    _field_type(config, key)  # Unknown keys fail with one line.
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f'Sweep value {value!r} does not fit {key}: {e}') from None
  return config


def run_name(overrides: Overrides) -> str:
  """'model.variant=Ti/4' -> 'variant=Ti_4'; the leaf names keep it short."""
  leaves = [k.split('.')[-1] for k in overrides]
  keys = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, overrides)]
  text = ','.join(f'{k}={v}' for k, v in zip(keys, overrides.values())) or 'base'
  return re.sub(r'[^\w.=,+@-]', '_', text)


def with_arg_overrides(config_arg: str, overrides: Overrides) -> str:
  """'configs/x.py:variant=B/16' + {'arg.merger': 'none'} -> 'configs/x.py:variant=B/16,merger=none'."""
  path, _, arg = config_arg.partition(':')
  items = dict(item.split('=', 1) for item in filter(None, arg.split(',')) if '=' in item)
  items.update({k[len(ARG_PREFIX):]: str(v) for k, v in overrides.items()
                if k.startswith(ARG_PREFIX)})
  return path + (':' + ','.join(f'{k}={v}' for k, v in items.items()) if items else '')


# The config file behind --config=FILE[:ARGS]: its get_sweep(), and get_config() again
# for each run, since `arg.` keys change the arg string the config is built from.

def config_module(config_arg: str) -> types.ModuleType:
  """The config file of 'FILE[:ARGS]', loaded as a module."""
  path = config_arg.partition(':')[0]
  spec = importlib.util.spec_from_file_location('swept_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_sweep(module: types.ModuleType, config_arg: str) -> list[Overrides]:
  """The runs of the config file's get_sweep(ARGS): the sweep when none is given."""
  path, _, arg = config_arg.partition(':')
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'Give --sweep=KEY=VALUES, or define get_sweep() in {path}.')
  return module.get_sweep(arg or None)


def flag_overrides(base_flags: Sequence[str]) -> dict[str, str]:
  """['--config.lr.base=0.1'] -> {'lr.base': '0.1'}: the overrides given for every run."""
  overrides = {}
  for flag in base_flags:
    key, sep, value = flag[len('--config.'):].partition('=')
    if not sep:
      raise ConfigError(f'{flag}: give every run\'s override as --config.KEY=VALUE.')
    overrides[key] = value
  return overrides


def config_for(module: types.ModuleType, config_arg: str, base_overrides: Mapping[str, str],
               overrides: Overrides) -> ml_collections.ConfigDict:
  """A run's base config: the config file rebuilt with the run's arg string, plus the
  overrides for every run, typed as their fields (`overrides` are applied later)."""
  arg = with_arg_overrides(config_arg, overrides).partition(':')[2]
  base = module.get_config(arg or None)
  typed = {k: typed_value(base, k, v) for k, v in base_overrides.items()}
  return apply_overrides(base, typed)


def run_configs(runs: Sequence[Overrides],
                base_config: Callable[[Overrides], ml_collections.ConfigDict]
                ) -> list[ml_collections.ConfigDict]:
  """Each run's full config; unknown keys and wrong types fail here, before any run."""
  return [apply_overrides(base_config(overrides), overrides) for overrides in runs]


def train_command(config_arg: str, base_flags: Sequence[str], workdir: str,
                  overrides: Overrides) -> str:
  """The `train.py` command line of one run, for a cluster launcher."""
  def flag_value(value):
    return str(value) if not isinstance(value, tuple) else repr(value)
  parts = ['python', 'train.py', f'--config={with_arg_overrides(config_arg, overrides)}',
           *base_flags,
           *(f'--config.{k}={flag_value(v)}' for k, v in overrides.items()
             if not k.startswith(ARG_PREFIX)),
           f'--workdir={workdir}']
  return ' '.join(shlex.quote(p) for p in parts)


def run_sweep(config: ml_collections.ConfigDict, root: str, runs: Sequence[Overrides],
              train_fn: Callable[[ml_collections.ConfigDict, str], dict],
              validate_fn: Optional[Callable[[ml_collections.ConfigDict], None]] = None,
              config_for: Optional[Callable[[Overrides], ml_collections.ConfigDict]] = None
              ) -> list[dict]:
  """Runs each override set in ROOT/<name>, one after another; returns one row per run.

  `config_for(overrides)` builds a run's base config (needed for `arg.` keys);
  by default every run starts from `config`. All run configs are built and
  validated before the first run starts.
  """
  configs = run_configs(runs, config_for or (lambda overrides: config))
  if validate_fn:
    for run_config in configs:
      validate_fn(run_config)
  rows = []
  for overrides, run_config in zip(runs, configs):
    workdir = os.path.join(root, run_name(overrides))
    result_path = os.path.join(workdir, RESULT_FILE)
    if os.path.exists(result_path):
      with open(result_path) as f:
        result = json.load(f)
      result['skipped'] = True
    else:
      start = time.perf_counter()
      summary = train_fn(run_config, workdir)
      result = {k: v for k, v in summary.items() if k in COLUMNS or k.startswith('fewshot/')}
      result['wall_s'] = time.perf_counter() - start
      with open(result_path, 'w') as f:
        json.dump(result, f, indent=2)
      result['skipped'] = False
    rows.append({'run': run_name(overrides), **overrides, **result})
  return rows


def write_results(root: str, rows: Sequence[dict], keys: Sequence[str]) -> str:
  """ROOT/results.csv, ROOT/results.png; returns the Markdown table."""
  fewshot_keys = sorted({k for r in rows for k in r if k.startswith('fewshot/')},
                        key=lambda k: int(k.split('/')[1].removesuffix('shot')))
  header = ['run', *keys, 'test/accuracy', *fewshot_keys, *COLUMNS[1:]]
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, header, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)

  def cell(value):
    return f'{value:.4g}' if isinstance(value, float) else str(value)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(cell(r.get(h, '')) for h in header) + ' |' for r in rows]
  _plot(os.path.join(root, 'results.png'), rows)
  return '\n'.join(lines)


def _plot(path: str, rows: Sequence[dict]) -> None:
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for axis, x_key, x_label in ((axes[0], 'train/images_per_sec', 'training images / second'),
                               (axes[1], 'gflops_per_image', 'GFLOPs / image')):
    for row in rows:
      if row.get(x_key) is None or row.get('test/accuracy') is None:
        continue
      axis.scatter(row[x_key], 100 * row['test/accuracy'])
      axis.annotate(row['run'], (row[x_key], 100 * row['test/accuracy']), fontsize=7,
                    xytext=(3, 3), textcoords='offset points')
    axis.set_xlabel(x_label)
    axis.set_ylabel('test accuracy (%)')
    axis.grid(alpha=0.3)
  fig.suptitle('Sweep: accuracy against speed and cost')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
