r"""What a pretraining run costs, per variant, with and without a PatchMerger.

  python -m benchmarks.compute_cost                                  # ImageNet-21k, 90 epochs
  python -m benchmarks.compute_cost --dataset=imagenet2012 --epochs=300 --peak_tflops=275

For each variant, the model of configs/<config>.py (its head, pre-logits and classes)
plain and with --merger: forward GFLOPs per image from the analytic matmul count
(patchmerger/flops.py; XLA's count agrees within a few percent, tests/test_flops.py),
training FLOPs as 3x the forward pass (forward, and a backward pass of about twice its
cost), the images of --epochs epochs, and the device-hours at --peak_tflops and --mfu.
Nothing is compiled: the table prints in seconds on any machine.
"""
import importlib

from absl import app, flags

from patchmerger import flops
from patchmerger.models import build_model

_DATASET = flags.DEFINE_enum('dataset', 'imagenet21k', ['imagenet21k', 'imagenet2012'],
                             'The pretraining config (configs/DATASET.py) whose model is costed.')
_VARIANTS = flags.DEFINE_list('variants', ['Ti/16', 'S/16', 'B/16', 'L/16', 'H/14'], 'Variants.')
_MERGER = flags.DEFINE_string('merger', '8', 'Merger spec of the PatchMerger rows (M@BLOCK).')
_EPOCHS = flags.DEFINE_float('epochs', 90, 'Epochs over the training set.')
_PEAK = flags.DEFINE_float('peak_tflops', 275., 'Peak dense bfloat16 TFLOP/s of one device '
                           '(TPU v4 chip: 275; A100: 312; H100 SXM: 989).')
_MFU = flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation assumed (0.4: a well-tuned ViT).')
# Training images per epoch of each config's train split.
EPOCH_IMAGES = {'imagenet21k': 13_000_000, 'imagenet2012': 1_268_355}


def rows(config_name: str, variants, merger: str, epochs: float, peak_tflops: float,
         mfu: float) -> list[dict]:
  module = importlib.import_module(f'configs.{config_name}')
  images = epochs * EPOCH_IMAGES[config_name]
  table = []
  for variant in variants:
    for spec in ('none', merger):
      config = module.get_config(f'variant={variant},merger={spec}')
      model = build_model(config.model, config.num_classes)
      size = config.input.image_size
      gflops = flops.analytic_gflops(model, (size, size, config.input.channels))
      train_flops = 3 * gflops * 1e9 * images
      table.append(dict(variant=variant, merger=spec, gflops=gflops, images=images,
                        train_exaflops=train_flops / 1e18,
                        device_hours=train_flops / (peak_tflops * 1e12 * mfu) / 3600))
  return table


def main(argv):
  del argv
  table = rows(_DATASET.value, _VARIANTS.value, _MERGER.value, _EPOCHS.value, _PEAK.value,
               _MFU.value)
  print(f'configs/{_DATASET.value}.py, {_EPOCHS.value:g} epochs; device-hours at '
        f'{_PEAK.value:g} TFLOP/s peak and {100 * _MFU.value:g}% MFU')
  print('| variant | merger | forward GFLOPs/image | training images | training EFLOPs '
        '| device-hours |')
  print('|---|---|---|---|---|---|')
  for row in table:
    print(f'| {row["variant"]} | {row["merger"]} | {row["gflops"]:.2f} | {row["images"]:.3g} '
          f'| {row["train_exaflops"]:,.0f} | {row["device_hours"]:,.0f} |')


if __name__ == '__main__':
  app.run(main)
