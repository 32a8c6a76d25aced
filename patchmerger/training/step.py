"""Pure train and eval steps; `loop.py` jits them with shardings."""
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from patchmerger.errors import ConfigError
from patchmerger.models import experts
from patchmerger.training.state import TrainState


def classification_loss(logits: jax.Array, labels: jax.Array, kind: str,
                        label_smoothing: float = 0.) -> jax.Array:
  """Per-example loss for integer labels: softmax or sigmoid cross-entropy, in
  float32 whatever the model's compute dtype."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  if kind == 'softmax_xent':
    return optax.softmax_cross_entropy(logits, targets)
  if kind == 'sigmoid_xent':
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1)
  raise ConfigError(f"loss must be 'softmax_xent' or 'sigmoid_xent', got {kind!r}")


def split_micro_batches(batch: Mapping[str, jax.Array], accum_steps: int) -> dict:
  """[accum_steps, batch / accum_steps, ...] with micro-batch i made of examples
  i, i + A, i + 2A, ... (strided): each device's contiguous rows of a sharded batch
  feed every micro-batch. Contiguous micro-batches would each sit on 1/A of the
  devices, and XLA would gather them there and repeat the work A times."""
  return jax.tree.map(lambda x: jnp.swapaxes(
      x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss: str, label_smoothing: float, accum_steps: int) -> tuple[TrainState, dict]:
  """One optimizer update on `batch`, split into `accum_steps` micro-batches. The loss
  minimised is the classification loss plus the MoE layers' auxiliary losses (none
  without experts); `train/loss` reports the classification loss alone."""
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params, micro, micro_rng):
    logits, collections = state.apply_fn(
        {'params': params}, micro['image'], train=True, mutable=['moe'],
        rngs={'dropout': micro_rng, 'gating': jax.random.fold_in(micro_rng, 1)})
    aux_loss, moe_metrics = experts.summarise(collections.get('moe', {}))
    per_example = classification_loss(logits, micro['label'], loss, label_smoothing)
    correct = jnp.argmax(logits, -1) == micro['label']
    measured = {'train/loss': per_example.mean(), 'train/accuracy': correct.mean()}
    measured |= {f'train/{k}': v for k, v in moe_metrics.items()}
    return per_example.mean() + aux_loss, measured

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    grads, measured = grad_fn(state.params, batch, rng)
  else:
    micro_batches = split_micro_batches(batch, accum_steps)

    def accumulate(carry, inputs):
      index, micro = inputs
      g, m = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches), rng))
    (grads, measured), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(accum_steps), micro_batches))
    grads, measured = jax.tree.map(lambda x: x / accum_steps, (grads, measured))

  new_state = state.apply_gradients(grads=grads)
  grad_norm = optax.global_norm(grads)
  metrics = dict(measured, **{
      'train/grad_norm': grad_norm,
      # optax.apply_if_finite skips exactly these updates when enabled.
      'train/update_skipped': 1. - jnp.isfinite(grad_norm).astype(jnp.float32),
      'train/param_norm': optax.global_norm(new_state.params)})
  return new_state, metrics


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, apply_fn: Any,
              loss: str) -> dict:
  """Sums over the real (mask == 1) examples of a padded batch; with experts, also
  their per-batch metrics (`moe/...`, e.g. the dropped fraction) under 'moe'."""
  logits, collections = apply_fn({'params': params}, batch['image'], train=False,
                                 mutable=['moe'])
  mask = batch['mask']
  per_example = classification_loss(logits, batch['label'], loss)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  per_class = jax.nn.one_hot(batch['label'], logits.shape[-1]) * mask[:, None]
  return {'loss_sum': jnp.sum(per_example * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask), 'class_count': per_class.sum(0),
          'class_correct': (per_class * correct[:, None]).sum(0),
          'moe': experts.summarise(collections.get('moe', {}))[1]}
