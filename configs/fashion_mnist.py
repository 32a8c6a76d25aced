r"""The embedded default: a small ViT + PatchMerger on real Fashion-MNIST, CPU.

  python train.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
  python train.py --config=configs/fashion_mnist.py:merger=none --workdir=/tmp/plain
  python train.py --config=configs/fashion_mnist.py:variant=S/4 --config.model.conv_stem='(32,64)' ...
  python train.py --config=configs/fashion_mnist.py:reducer=tokenlearner --workdir=/tmp/tl
  python eval.py --config=configs/fashion_mnist.py:merger=none --workdir=/tmp/plain \
      --config.model.reducer.kind=tome --config.model.reducer.r=2   # ToMe, no training

Arg string keys: variant (NAME/PATCH; sizes below override the name's), merger
(M, M@BLOCK, M@B+M@B or none), reducer (patchmerger, tokenlearner, pool, tome or
none; what sits in the merger slots), experts (none, sparse:ExK@WHERE or
soft:E[xSLOTS]@WHERE; see configs/common.parse_experts), steps.
"""
import ml_collections
from ml_collections import config_dict

from configs import common

MERGER = '8@1'  # The default merger (M@BLOCK); configs that load these models reuse it.


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='Ti/8', merger=MERGER, reducer='patchmerger',
                         experts='none', steps=2600)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # .npz or run dir to start from
  config.init_dont_load = ()             # regexes of parameters to re-initialise
  config.init_strict = True             # refuse weights that leave parameters at init
  config.init_upcycle = False           # MoE blocks from a dense checkpoint: experts = its MLP

  # Data: TFDS `fashion_mnist`, prepared offline from Debian's package on first use.
  config.dataset = 'fashion_mnist'
  config.data_dir = config_dict.placeholder(str)              # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.train_split = 'train'
  config.test_split = 'test'
  config.num_classes = 10
  config.input = ml_collections.ConfigDict(dict(
      image_size=32, channels=1, augment='none', shuffle_buffer=60_000,
      mean=0.286, std=0.353,           # Fashion-MNIST pixel statistics
      data_threads=1,                  # 2 cores: leave them to the training step
      num_shards=0))                   # data shards (0: one per process); fix it to
                                       # keep the data order when the host count changes

  # Model: 28px images resized to 32; an early-convolution stem (three 3x3/2
  # convolutions, 32/64/128 channels, then the 3x3/1 `embedding`) gives 4x4 = 16
  # tokens; one PatchMerger before block 1 of 4 merges them into 8. On 2 CPU
  # cores in 10 minutes, convolutions buy more accuracy than transformer depth:
  # this stem with depth 4 reached 90.8% where the (16, 32) stem with depth 6
  # reached 89.6% (docs/results.md, section 6).
  config.model = common.model_config(
      arg.variant, arg.merger, arg.reducer, arg.experts, width=128, depth=4, mlp_dim=256,
      num_heads=4,
      classifier='gap', conv_stem=(32, 64, 128))

  # Optimisation.
  config.batch_size = 128              # global, over all devices and hosts
  config.total_steps = arg.steps
  config.accum_steps = 1
  config.loss = 'softmax_xent'         # softmax_xent | sigmoid_xent
  config.label_smoothing = 0.1
  config.skip_nonfinite_updates = 0    # 0: stop at NaN/Inf; N: skip <= N bad updates in a row
  config.optim = ml_collections.ConfigDict(dict(
      name='adamw', b1=0.9, b2=0.999, weight_decay=0.05, clip_norm=1.0,
      mu_dtype=config_dict.placeholder(str)))  # Adam's first moment: None (f32) | bfloat16
  config.lr = ml_collections.ConfigDict(dict(
      base=1e-3, warmup_steps=200, decay='cosine', end_value=0.0))


  # Loop.
  config.log_every = 50
  # Test accuracy every N steps; few-shot probes on the pre-logits, inference speed and
  # merge pictures in eval.py (--config.evals.NAME.every=N runs one in training too).
  config.evals = common.evals_config(
      every=max(arg.steps // 2, 1),
      fewshot=common.fewshot_config(pool_examples=2_000, test_examples=2_000))
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1,       # device axes; -1: all remaining devices
      fsdp_min_size=2 ** 12))          # smaller arrays stay replicated under fsdp
  config.distributed = 'auto'          # True | False | auto: only when a cluster is detected
  return config


def get_sweep(arg: str = None) -> list[dict]:
  """Model sizes x merger sizes; `python sweep.py --config=configs/fashion_mnist.py
  --workdir=W` runs these when no --sweep is given (overrides apply to all)."""
  del arg  # The same sweep for every arg string.
  return [{'model.width': width, 'model.mlp_dim': 2 * width, 'model.merger.num_tokens': m}
          for width in (64, 128) for m in (4, 8)]
