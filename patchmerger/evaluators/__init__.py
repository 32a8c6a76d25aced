"""Evaluators behind one interface, chosen by the `config.evals` mapping (as big_vision's
`config.evals`): NAME -> {kind, every, ...}. Training runs each every `every` steps and at
the last step; eval.py runs them all once.

Kinds: classification (loss, accuracy, per class), fewshot (linear probes on the
pre-logits), throughput (inference images/s), merge_pictures (what merged tokens see).
"""
from typing import Any, Iterable

from patchmerger.errors import ConfigError
from patchmerger.evaluators import classification, common, fewshot, merge_pictures, throughput

Context = common.Context
Evaluator = common.Evaluator
KINDS = {'classification': classification.Evaluator, 'fewshot': fewshot.Evaluator,
         'throughput': throughput.Evaluator, 'merge_pictures': merge_pictures.Evaluator}


def kind_of(name: str, spec: Any) -> str:
  """An evaluator's kind: its `kind` field, else its name."""
  kind = spec.get('kind') or name
  if kind not in KINDS:
    raise ConfigError(f'config.evals.{name}: unknown kind {kind!r}; one of '
                      f'{", ".join(KINDS)}.')
  return kind


def from_config(config: Any, context: common.Context,
                skip: Iterable[str] = ()) -> list[common.Evaluator]:
  """The evaluators of `config.evals`, in order, except those named in `skip`."""
  evals = config.get('evals') or {}
  return [KINDS[kind_of(name, spec)](name, spec, context)
          for name, spec in evals.items() if name not in set(skip)]
