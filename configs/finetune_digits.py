r"""Downstream fine-tuning on real handwritten digits (scikit-learn's 1,797 8x8
images, prepared offline as TFDS `digits`, resized to the upstream 32px).

  python train.py --config=configs/finetune_digits.py \
      --config.init_from=workdirs/fashion_mnist --workdir=workdirs/digits_ft
  python train.py --config=configs/finetune_digits.py --workdir=workdirs/digits_scratch
  python train.py --config=configs/finetune_digits.py:variant=B/16 \
      --config.init_from=ViT-B_16.npz ...     # a public checkpoint, head re-initialised

`init_from`: one of our run directories (its latest checkpoint) or a public-layout
`.npz`; position embeddings are resized, the head is re-initialised, a merger the
checkpoint lacks starts from its initialisation. The model section must match the
upstream run's (same arg string as configs/fashion_mnist.py).
"""
import ml_collections

from configs import common, fashion_mnist

MERGER = fashion_mnist.MERGER  # The upstream model's merger, so its weights fit.


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='Ti/8', merger=MERGER, reducer='patchmerger',
                         experts='none', steps=300)
  # The upstream config (fresh, so it can be edited), with the downstream data and schedule.
  config = fashion_mnist.get_config(f'variant={arg.variant},merger={arg.merger},'
                                    f'reducer={arg.reducer},experts={arg.experts}')
  config.dataset = 'digits'
  config.init_dont_load = ('head/.*',)   # A new task: a fresh (zero) head, as ViT does.
  config.num_classes = 10
  config.input.update(shuffle_buffer=2_000, mean=0.3, std=0.4)  # digits pixel statistics

  # Fine-tuning: short, small batch, no weight decay, SGD-like low warm-up.
  config.batch_size = 64
  config.total_steps = arg.steps
  config.optim.weight_decay = 0.0
  config.lr.update(base=5e-4, warmup_steps=30)
  config.log_every = 25
  config.evals.test.every = 100
  config.checkpoint_every = 100
  return config
