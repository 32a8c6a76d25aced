r"""Fine-tunes one of our runs, or a public `.npz`, on your own images:
PATH/<split>/<class>/*.{jpg,jpeg,png}, e.g. PATH/train/cat/1.jpg, PATH/test/cat/9.jpg.

  python train.py --config=configs/finetune_folder.py:path=PATH,num_classes=5 \
      --config.init_from=workdirs/imagenet21k_b16 --workdir=workdirs/my_images
  python train.py --config=configs/finetune_folder.py:path=PATH,num_classes=5,variant=B/16,res=224 \
      --config.init_from=ViT-B_16.npz --workdir=...

The folder is written once as a TFDS dataset into the data dir (prepare.py, on
first use); `num_classes` must equal its class count (checked with one line).
The model section (variant, merger, and `--config.model.*` overrides) must be
the upstream run's. The recipe is configs/transfer.py's (SGD, momentum 0.9,
cosine) at a smaller batch.
Arg string keys: path, num_classes, variant, merger, reducer, res, steps, batch.
"""
import ml_collections

from configs import common, transfer


def get_config(arg: str = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, path='images', num_classes=2, variant='B/16', merger='8',
                         reducer='patchmerger', experts='none', res=224, steps=500, batch=64)
  config = transfer.get_config(f'dataset=oxford_iiit_pet,variant={arg.variant},'
                               f'merger={arg.merger},reducer={arg.reducer},experts={arg.experts},'
                               f'res={arg.res},'
                               f'steps={arg.steps}')
  config.dataset = f'folder:{arg.path}'
  config.train_split = 'train'
  config.test_split = 'test'
  config.num_classes = arg.num_classes
  config.batch_size = arg.batch
  config.lr.base = 0.01                # a smaller batch than the papers' 512
  config.input.shuffle_buffer = 10_000
  return config
