"""Small image files and datasets for the data tests: JPEG/PNG bytes, per-class
tars with ImageNet's bad files, image folders, and mock TFDS datasets whose
examples are encoded images of varied sizes."""
import contextlib
import io
import tarfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image


def encode(array: np.ndarray, fmt: str = 'JPEG', mode: str = 'RGB', quality: int = 90) -> bytes:
  out = io.BytesIO()
  image = Image.fromarray(array).convert(mode)
  image.save(out, format=fmt, **({'quality': quality} if fmt == 'JPEG' else {}))
  return out.getvalue()


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


BAD_FILES = {  # class index, image index -> what ImageNet has
    (0, 1): 'corrupt', (1, 2): 'cmyk', (2, 3): 'png'}


def write_class_tars(root, classes=('n02', 'n01', 'n03'), per_class=6, seed=0) -> None:
  """`<wnid>.tar` per class, `per_class` JPEGs each, with a truncated JPEG, a
  CMYK JPEG and a PNG named .JPEG among them (BAD_FILES)."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for c, wnid in enumerate(classes):
    with tarfile.open(root / f'{wnid}.tar', 'w') as tar:
      for i in range(per_class):
        data = encode(random_image(rng, 40 + i, 48))
        bad = BAD_FILES.get((c, i))
        if bad == 'corrupt':
          data = data[:len(data) // 3]
        elif bad == 'cmyk':
          data = encode(random_image(rng, 36, 36), mode='CMYK')
        elif bad == 'png':
          data = encode(random_image(rng, 36, 36), fmt='PNG')
        info = tarfile.TarInfo(f'{wnid}_{i}.JPEG')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_image_folder(root, splits=('train', 'test'), classes=('cat', 'dog', 'owl'),
                       per_class=4, seed=0) -> None:
  """root/<split>/<class>/<i>.jpg (train) or .png (other splits)."""
  rng = np.random.default_rng(seed)
  for split in splits:
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        fmt, suffix = ('JPEG', 'jpg') if split == 'train' else ('PNG', 'png')
        (folder / f'{i}.{suffix}').write_bytes(encode(random_image(rng, 24 + 4 * i, 32), fmt))


@contextlib.contextmanager
def mock_images(num_examples: int, seed: int = 0):
  """tfds.testing.mock_data whose examples are only {'image', 'label'}: images
  encoded in the dataset's own format (fixed shape, or 20-48 px sides), labels
  cycling over the classes. Works for datasets whose other mock features fail."""
  def as_dataset(builder, split, decoders=None, **kwargs):
    del split, kwargs
    feature = builder.info.features['image']
    num_classes = builder.info.features['label'].num_classes
    rng = np.random.default_rng(seed)
    fmt = 'PNG' if feature.encoding_format == 'png' else 'JPEG'
    height, width = feature.shape[:2]
    images = [encode(random_image(rng, height or int(rng.integers(20, 49)),
                                  width or int(rng.integers(20, 49))), fmt)
              for _ in range(num_examples)]
    data = tf.data.Dataset.from_tensor_slices(
        {'image': images, 'label': np.arange(num_examples) % num_classes})
    if not (decoders and isinstance(decoders.get('image'), tfds.decode.SkipDecoding)):
      data = data.map(lambda ex: {**ex, 'image': tf.io.decode_image(
          ex['image'], channels=3, expand_animations=False)})
    return data

  with tfds.testing.mock_data(num_examples=num_examples, as_dataset_fn=as_dataset):
    yield
