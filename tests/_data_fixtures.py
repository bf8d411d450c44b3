"""A small real tfds image dataset for tests: prepared in a temporary data_dir with tfds itself."""

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds


class ScoreflowTestImages(tfds.core.GeneratorBasedBuilder):
  """Twelve random RGB images of varying sizes (all >= 140 pixels, for the CelebA crop)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for index in range(12):
      shape = (150 + index % 4, 141 + 3 * index, 3)
      yield index, {"image": PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)), "label": index % 3}
