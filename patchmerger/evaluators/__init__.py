"""Evaluators behind one interface, chosen by the `config.evals` mapping (as big_vision's
`config.evals`): NAME -> {kind, every, ...}. Training runs each every `every` steps and at
the last step; eval.py runs them all once. They run in the order of KINDS, then by name:
merge pictures last, as the only one that writes into the workdir.

Kinds: classification (loss, accuracy, per class), throughput (inference images/s),
fewshot (linear probes on the pre-logits), merge_pictures (what merged tokens see).
"""
from typing import Any, Iterable

from patchmerger.errors import ConfigError
from patchmerger.evaluators import classification, common, fewshot, merge_pictures, throughput

Context = common.Context
Evaluator = common.Evaluator
KINDS = {'classification': classification.Evaluator, 'throughput': throughput.Evaluator,
         'fewshot': fewshot.Evaluator, 'merge_pictures': merge_pictures.Evaluator}


def kind_of(name: str, spec: Any) -> str:
  """An evaluator's kind: its `kind` field, else its name."""
  kind = spec.get('kind') or name
  if kind not in KINDS:
    raise ConfigError(f'config.evals.{name}: unknown kind {kind!r}; one of '
                      f'{", ".join(KINDS)}.')
  return kind


def from_config(config: Any, context: common.Context,
                skip: Iterable[str] = ()) -> list[common.Evaluator]:
  """The evaluators of `config.evals`, in order, except those named in `skip`. The order
  is the same on every process: several of them run collectives."""
  skip, order = set(skip), list(KINDS)
  specs = sorted(((order.index(kind_of(name, spec)), name, spec)
                  for name, spec in (config.get('evals') or {}).items() if name not in skip),
                 key=lambda entry: entry[:2])
  return [KINDS[order[index]](name, spec, context) for index, name, spec in specs]
