r"""Upstream training on ImageNet-1k from scratch (needs manual TFDS preparation).

Follows big_vision's `vit_s16_i1k` (Beyer et al. 2022, arXiv 2205.01580; 76.5% for
S/16 in 90 epochs there): batch 1024, 90 epochs, Adam (0.9, 0.999) with learning rate
1e-3, weight decay 1e-4 (big_vision's `wd`, which does not scale with the learning rate:
optax.adamw's 0.1 here, which does), gradient clipping at 1, 10k warm-up steps then cosine decay,
softmax cross-entropy, a GAP head with a pre-logits layer as wide as the model,
sincos2d position embeddings, inception crop and flip for training, a central 224
crop of the 256 short side for evaluation, train[:99%] for training.
Left out: RandAugment(2, 10) and mixup (p = 0.2), which the input pipeline lacks, so
expect lower accuracy than big_vision's. Adam's first moment stays float32 (big_vision:
bfloat16; --config.optim.mu_dtype=bfloat16). Its evaluations on minival, ImageNet-v2 and
ReaL are left to eval.py with --config.test_split and --config.dataset.

  python train.py --config=configs/imagenet2012.py:variant=S/16 --workdir=...
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from patchmerger.models.vit import parse_variant


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='S/16', merger='8', reducer='patchmerger',
                         experts='none', epochs=90)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # .npz or run dir to start from
  config.init_dont_load = ()             # regexes of parameters to re-initialise
  config.init_strict = True             # refuse weights that leave parameters at init
  config.init_upcycle = False           # MoE blocks from a dense checkpoint: experts = its MLP

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

  config.model = common.model_config(arg.variant, arg.merger, arg.reducer, arg.experts,
                                     classifier='gap',
                                     posemb='sincos2d',
                                     representation_size=parse_variant(arg.variant)['width'],
                                     dtype='bfloat16')  # bf16 compute, f32 params

  config.batch_size = 1024
  config.total_steps = int(arg.epochs * 1_268_355 / 1024)
  config.accum_steps = 1
  config.loss = 'softmax_xent'
  config.label_smoothing = 0.0
  config.skip_nonfinite_updates = 0    # 0: stop at NaN/Inf; N: skip <= N bad updates in a row
  config.optim = ml_collections.ConfigDict(dict(
      name='adamw', b1=0.9, b2=0.999, weight_decay=0.1, clip_norm=1.0,  # = big_vision wd 1e-4
      mu_dtype=config_dict.placeholder(str)))  # Adam's first moment: None (f32) | bfloat16
  config.lr = ml_collections.ConfigDict(dict(
      base=1e-3, warmup_steps=10_000, decay='cosine', end_value=0.0))


  config.log_every = 50
  # Few-shot probes, inference speed and merge pictures run in eval.py
  # (--config.evals.NAME.every=N runs one in training too).
  config.evals = common.evals_config(
      every=2500,
      # The first 50,000 training images hold about 50 per class.
      fewshot=common.fewshot_config(pool_examples=50_000, test_examples=10_000))
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1,       # device axes; -1: all remaining devices
      fsdp_min_size=2 ** 12))          # smaller arrays stay replicated under fsdp
  config.distributed = 'auto'          # True | False | auto: only when a cluster is detected
  return config
