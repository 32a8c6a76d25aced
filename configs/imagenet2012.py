r"""Upstream training on ImageNet-1k from scratch (needs manual TFDS preparation).

ViT recipe on ImageNet-1k as in big_vision's `vit_i1k`: AdamW, weight decay
0.0001 decoupled, batch 4096, 90 epochs, cosine decay, GAP head.

  python train.py --config=configs/imagenet2012.py:variant=S/16 --workdir=...
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='S/16', merger='8', reducer='patchmerger', epochs=90)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # .npz or run dir to start from
  config.init_dont_load = ()             # regexes of parameters to re-initialise
  config.init_strict = True             # refuse weights that leave parameters at init

  config.dataset = 'imagenet2012'
  config.data_dir = config_dict.placeholder(str)
  config.train_split = 'train[:99%]'
  config.test_split = 'validation'
  config.num_classes = 1000
  config.input = ml_collections.ConfigDict(dict(
      image_size=224, channels=3, augment='inception_crop_flip',
      shuffle_buffer=250_000, mean=0.5, std=0.5,
      eval_crop_ratio=0.875,           # evaluation: short side to 224 / 0.875, central 224
      data_threads=0,                  # 0: tf.data autotunes its threads
      num_shards=0))                   # data shards (0: one per process); fix it to
                                       # keep the data order when the host count changes

  config.model = common.model_config(arg.variant, arg.merger, arg.reducer, classifier='gap',
                                     posemb='sincos2d',
                                     dtype='bfloat16')  # bf16 compute, f32 params

  config.batch_size = 1024
  config.total_steps = int(arg.epochs * 1_268_355 / 1024)
  config.accum_steps = 1
  config.loss = 'softmax_xent'
  config.label_smoothing = 0.0
  config.skip_nonfinite_updates = 0    # 0: stop at NaN/Inf; N: skip <= N bad updates in a row
  config.optim = ml_collections.ConfigDict(dict(
      name='adamw', b1=0.9, b2=0.999, weight_decay=0.0001, clip_norm=1.0,
      mu_dtype=config_dict.placeholder(str)))  # Adam's first moment: None (f32) | bfloat16
  config.lr = ml_collections.ConfigDict(dict(
      base=1e-3, warmup_steps=10_000, decay='cosine', end_value=0.0))

  config.log_every = 50
  config.eval_every = 2500
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1,                 # device axes; -1: all remaining devices
      fsdp_min_size=2 ** 12))          # smaller arrays stay replicated under fsdp
  config.distributed = 'auto'          # True | False | auto: only when a cluster is detected
  return config
