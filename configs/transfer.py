r"""Downstream transfer as in the ViT papers: fine-tune a pretrained run or a public
`.npz` on a TFDS dataset at 384px.

  python train.py --config=configs/transfer.py:dataset=cifar10,variant=B/16,res=384 \
      --config.init_from=ViT-B_16.npz --workdir=workdirs/cifar10_b16
  python train.py --config=configs/transfer.py:dataset=oxford_iiit_pet \
      --config.init_from=workdirs/imagenet21k_b16 --workdir=...     # one of our runs

Recipe (Dosovitskiy et al. 2021, appendix B.1.1; google-research/vision_transformer):
SGD with momentum 0.9, no weight decay, global-norm clipping at 1, linear warm-up
then cosine decay, batch 512, the steps of the table below, inception crop and
flip for training, resolution `res` (the checkpoint's position embedding is
resized on load), a fresh zero head. cifar10, cifar100, oxford_iiit_pet and
oxford_flowers102 download by themselves through TFDS; imagenet2012 needs TFDS's
manual preparation (README, "Data"). Its minival, train[99%:], is held out of
training: `--config.test_split=train[99%:]` evaluates on it while tuning.
Arg string keys: dataset, variant, merger, reducer, res, steps (0: the table's).
"""
import ml_collections
from ml_collections import config_dict

from configs import common

# dataset: (classes, train split, test split, steps, warm-up steps, base learning rate)
DATASETS = {
    'cifar10': (10, 'train', 'test', 10_000, 500, 0.03),
    'cifar100': (100, 'train', 'test', 10_000, 500, 0.03),
    'oxford_iiit_pet': (37, 'train', 'test', 500, 100, 0.03),
    'oxford_flowers102': (102, 'train', 'test', 500, 100, 0.03),
    'imagenet2012': (1000, 'train[:99%]', 'validation', 20_000, 500, 0.03),
}


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, dataset='cifar10', variant='B/16', merger='8',
                         reducer='patchmerger', experts='none', res=384, steps=0)
  if arg.dataset not in DATASETS:
    raise ValueError(f'Unknown transfer dataset {arg.dataset!r}; this config takes '
                     f'{", ".join(DATASETS)}.')
  num_classes, train_split, test_split, steps, warmup, lr = DATASETS[arg.dataset]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # .npz or run dir to fine-tune
  config.init_dont_load = ('head/.*',)   # A new task: a fresh (zero) head.
  config.init_strict = True             # refuse weights that leave parameters at init
  config.init_upcycle = False           # MoE blocks from a dense checkpoint: experts = its MLP

  config.dataset = arg.dataset
  config.data_dir = config_dict.placeholder(str)
  config.train_split = train_split
  config.test_split = test_split
  config.num_classes = num_classes
  config.input = ml_collections.ConfigDict(dict(
      image_size=arg.res, channels=3, augment='inception_crop_flip',
      shuffle_buffer=50_000, mean=0.5, std=0.5,
      eval_crop_ratio=1.0,             # evaluation: short side to res, central square
      data_threads=0,                  # 0: tf.data autotunes its threads
      num_shards=0))                   # data shards (0: one per process)

  config.model = common.model_config(arg.variant, arg.merger, arg.reducer, arg.experts,
                                     classifier='token',
                                     dtype='bfloat16')  # bf16 compute, f32 params

  config.batch_size = 512
  config.total_steps = arg.steps or steps
  config.accum_steps = 1
  config.loss = 'softmax_xent'
  config.label_smoothing = 0.0
  config.skip_nonfinite_updates = 0
  config.optim = ml_collections.ConfigDict(dict(
      name='sgd', b1=0.9,              # b1: the momentum
      b2=0.999, weight_decay=0.0, clip_norm=1.0,
      mu_dtype=config_dict.placeholder(str)))  # Adam's first moment: None (f32) | bfloat16
  config.lr = ml_collections.ConfigDict(dict(
      base=lr, warmup_steps=min(warmup, config.total_steps // 2), decay='cosine',
      end_value=0.0))


  config.log_every = 50
  # Few-shot probes, inference speed and merge pictures run in eval.py
  # (--config.evals.NAME.every=N runs one in training too).
  config.evals = common.evals_config(
      every=max(config.total_steps // 5, 1),
      fewshot=common.fewshot_config(pool_examples=10_000, test_examples=10_000))
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, fsdp_min_size=2 ** 12))
  config.distributed = 'auto'          # True | False | auto: only when a cluster is detected
  return config
