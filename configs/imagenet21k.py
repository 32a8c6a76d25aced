r"""Paper-style upstream pretraining on ImageNet-21k (needs the data and accelerators).

The PatchMerger paper pretrains ViTs upstream with the standard ViT recipe:
Adam (0.9, 0.999), weight decay 0.1, linear warm-up then decay, sigmoid
cross-entropy, batch 4096, 224px; one merger halfway with M=8. The pre-logits
layer is as wide as the model (768 for B/16, 1024 for L/16), as in the public
ImageNet-21k ViT checkpoints.

  python train.py --config=configs/imagenet21k.py:variant=B/16 --workdir=gs://...
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from patchmerger.models.vit import parse_variant


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='B/16', merger='8', reducer='patchmerger',
                         experts='none', epochs=90)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # .npz or run dir to start from
  config.init_dont_load = ()             # regexes of parameters to re-initialise
  config.init_strict = True             # refuse weights that leave parameters at init
  config.init_upcycle = False           # MoE blocks from a dense checkpoint: experts = its MLP

  config.dataset = 'imagenet21k'       # TFDS name; prepare it as TFDS documents
  config.data_dir = config_dict.placeholder(str)
  config.train_split = 'full[51200:]'
  config.test_split = 'full[:51200]'
  config.num_classes = 21843
  config.input = ml_collections.ConfigDict(dict(
      image_size=224, channels=3, augment='inception_crop_flip',
      shuffle_buffer=250_000, mean=0.5, std=0.5,
      eval_crop_ratio=0.875,           # evaluation: short side to 224 / 0.875, central 224
      data_threads=0,                  # 0: tf.data autotunes its threads
      num_shards=0))                   # data shards (0: one per process); fix it to
                                       # keep the data order when the host count changes

  config.model = common.model_config(arg.variant, arg.merger, arg.reducer, arg.experts,
                                     classifier='token',
                                     representation_size=parse_variant(arg.variant)['width'],
                                     dtype='bfloat16')  # bf16 compute, f32 params

  config.batch_size = 4096
  config.total_steps = int(arg.epochs * 13_000_000 / 4096)
  config.accum_steps = 1
  config.loss = 'sigmoid_xent'
  config.label_smoothing = 0.0
  config.skip_nonfinite_updates = 0    # 0: stop at NaN/Inf; N: skip <= N bad updates in a row
  config.optim = ml_collections.ConfigDict(dict(
      name='adamw', b1=0.9, b2=0.999, weight_decay=0.1, clip_norm=1.0,
      mu_dtype=config_dict.placeholder(str)))  # Adam's first moment: None (f32) | bfloat16
  config.lr = ml_collections.ConfigDict(dict(
      base=1e-3, warmup_steps=10_000, decay='linear', end_value=1e-5))


  config.log_every = 50
  # Few-shot probes, inference speed and merge pictures run in eval.py
  # (--config.evals.NAME.every=N runs one in training too).
  config.evals = common.evals_config(
      every=5000,
      # The first 100,000 training images hold 4 to 5 per class of the 21,843.
      fewshot=common.fewshot_config(pool_examples=100_000, test_examples=10_000, shots=(1, 5)))
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1,       # device axes; -1: all remaining devices
      fsdp_min_size=2 ** 12))          # smaller arrays stay replicated under fsdp
  config.distributed = 'auto'          # True | False | auto: only when a cluster is detected
  return config
