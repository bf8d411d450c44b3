"""The Flax FID Inception is pytorch-fid's InceptionV3 (FID variant): same outputs for the same random weights.

The reference is the real pytorch-fid code (`pytorch_fid.inception.InceptionV3`, which builds torchvision's
Inception-v3 and patches in the FID blocks), given random weights through its own loading path: its weight
download is replaced by a function that randomizes the freshly built network and returns its state dict. The
same state dict goes through :func:`fid_inception_from_torch`, the converter users apply to the real weights.

Tolerances. float64: every output is a sum over at most ~25 sequential layers of dot products of length
K <= 4032; each layer adds a relative rounding error of about sqrt(K) u (u = 1.1e-16, ~7e-15), so the
outputs agree to ~5 sqrt(K) u ~ 4e-14 of their scale; 1e-12 leaves a margin of 25. float32 (u = 6e-8): the
same estimate gives ~2e-5; measured ~1e-6. torch and this module need `pip install -e .[test]`; without
them the comparisons are skipped.
"""

import importlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow.evaluate import (FID_INCEPTION_NUM_CLASSES, FID_INCEPTION_NUM_FEATURES, FIDInceptionV3,
                                bilinear_resize, convert_pytorch_fid_weights, fid_inception_features,
                                fid_inception_from_torch, fid_inception_outputs, fid_inception_to_torch,
                                init_fid_inception, load_fid_inception, save_fid_inception)
from scoreflow.evaluate import inception as inception_module

_TORCHVISION_OPERATOR_MODULES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def _import_torch():
  try:
    return importlib.import_module("torch")
  except ImportError:
    pytest.skip("torch is not installed; `pip install -e .[test]` installs the CPU build used by CI")


def _import_pytorch_fid():
  """Returns `(torch, torchvision, pytorch_fid.inception)`, or skips the test with the reason.

  PyPI's torchvision wheels are built against CUDA builds of torch; beside the CPU-only torch their compiled
  operators (nms, roi_align, ...) cannot load, and `import torchvision` then fails while registering those
  operators' meta kernels ("operator torchvision::nms does not exist"). pytorch-fid uses only torchvision's
  Python Inception modules (convolutions, batch norm, pooling), so in that case the import is retried
  without the two registration modules of the compiled operators.
  """
  torch = _import_torch()
  try:
    torchvision = importlib.import_module("torchvision")
  except ImportError:
    pytest.skip("torchvision is not installed; `pip install -e .[test]` installs it")
  except RuntimeError as error:
    if "torchvision::" not in str(error):
      raise
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
      del sys.modules[name]
    for name in _TORCHVISION_OPERATOR_MODULES:
      sys.modules[name] = types.ModuleType(name)
    torchvision = importlib.import_module("torchvision")
  try:
    fid_inception = importlib.import_module("pytorch_fid.inception")
  except ImportError:
    pytest.skip("pytorch-fid is not installed; `pip install -e .[test]` installs it")
  return torch, torchvision, fid_inception


def _randomize_(torch, network, seed=0):
  """Random weights with He-scaled convolutions and non-trivial batch-norm statistics, in place."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in network.modules():
      if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
      elif isinstance(module, torch.nn.Linear):
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.weight.shape[1] ** 0.5)
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


@pytest.fixture(scope="module")
def pytorch_fid_reference():
  """`(build, state_dict)`: `build(resize_input) -> (pytorch-fid InceptionV3, its fc layer)` with one set of
  random weights, and those weights as a `{name: float32 NumPy array}` state dict."""
  torch, torchvision, fid_inception = _import_pytorch_fid()
  weights = {}

  def build(resize_input):
    networks = []
    original = torchvision.models.inception_v3

    def inception_v3_spy(*args, **kwargs):
      networks.append(original(*args, **kwargs))
      return networks[-1]

    def random_weights(*args, **kwargs):
      del args, kwargs  # instead of downloading pt_inception-2015-12-05-6726825d.pth
      if not weights:
        _randomize_(torch, networks[-1])
        weights.update({name: value.clone() for name, value in networks[-1].state_dict().items()})
      return {name: value.clone() for name, value in weights.items()}

    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(torchvision.models, "inception_v3", inception_v3_spy)
      patch.setattr(fid_inception, "load_state_dict_from_url", random_weights)
      model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                                        resize_input=resize_input).eval()
    return model, networks[-1].fc

  build(False)  # draws the weights
  return build, {name: value.numpy() for name, value in weights.items()}


def _reference_outputs(model, fc, images_nchw):
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    pool = model(images_nchw)[0][:, :, 0, 0]
    return pool.numpy(), fc(pool).numpy()


def _relative_error(actual, expected):
  return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("in_size,out_size", [((37, 45), (299, 299)), ((64, 80), (29, 31)), ((5, 6), (5, 6))])
def test_bilinear_resize_is_torch_interpolate(in_size, out_size):
  # pytorch-fid's resize: F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False). Upsampling,
  # shrinking (where jax.image.resize would antialias) and the identity; float64 both sides.
  torch = _import_torch()
  images = np.random.default_rng(0).uniform(size=(2, 3, *in_size))
  expected = torch.nn.functional.interpolate(torch.from_numpy(images), size=out_size, mode="bilinear",
                                             align_corners=False).numpy()
  actual = bilinear_resize(jnp.asarray(images.transpose(0, 2, 3, 1)), *out_size)
  assert actual.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(actual).transpose(0, 3, 1, 2), expected, rtol=0, atol=1e-14)


def test_port_matches_pytorch_fid_float64(pytorch_fid_reference):
  # No resize (both accept any size >= 75x75). 139x155: the smallest height at which Mixed_7c still sees a 3x3
  # grid (at 75..138 it sees 1x1 or 2x2, where its max-pool quirk cannot show: a 3x3 pool of a 1x1 map is the
  # identity); non-square so that a swapped height/width would show. Three images in batches of two: the
  # last batch is padded and reuses the first batch's compilation.
  build, state_dict = pytorch_fid_reference
  model, fc = build(resize_input=False)
  images = np.random.default_rng(1).uniform(size=(3, 3, 139, 155))
  expected_pool, expected_logits = _reference_outputs(model.double(), fc.double(), _import_torch().from_numpy(images))
  variables = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), fid_inception_from_torch(state_dict))
  compilations = inception_module._jit_fid_inception_features._cache_size()
  pool, logits = fid_inception_outputs(variables, images.transpose(0, 2, 3, 1), batch_size=2, image_range=(0, 1),
                                       resize_input=False)
  assert inception_module._jit_fid_inception_features._cache_size() == compilations + 1
  assert pool.shape == (3, FID_INCEPTION_NUM_FEATURES) and logits.shape == (3, FID_INCEPTION_NUM_CLASSES)
  assert pool.dtype == logits.dtype == np.float64
  assert _relative_error(pool, expected_pool) < 1e-12
  assert _relative_error(logits, expected_logits) < 1e-12


@pytest.mark.slow
def test_port_matches_pytorch_fid_at_299_float32(pytorch_fid_reference):
  # pytorch-fid's default path: resize to 299x299 and scale [0, 1] -> [-1, 1], in float32. The images are
  # 8-bit (uint8 37x45): fid_inception_features reads them as x / 255, the reference gets x / 255 as float32.
  build, state_dict = pytorch_fid_reference
  model, fc = build(resize_input=True)
  images = np.random.default_rng(2).integers(0, 256, size=(2, 37, 45, 3), dtype=np.uint8)
  torch = _import_torch()
  expected_pool, expected_logits = _reference_outputs(
      model.float(), fc.float(), torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255))
  pool, logits = fid_inception_outputs(fid_inception_from_torch(state_dict), images)
  assert pool.dtype == logits.dtype == np.float32
  assert _relative_error(pool, expected_pool) < 3e-5
  assert _relative_error(logits, expected_logits) < 3e-5


def test_convert_pytorch_fid_weights(pytorch_fid_reference, tmp_path):
  # The user's conversion step: a .pth state dict (here the random one) -> .npz -> Flax variables.
  torch = _import_torch()
  _, state_dict = pytorch_fid_reference
  torch.save({name: torch.from_numpy(value) for name, value in state_dict.items()}, tmp_path / "weights.pth")
  converted = convert_pytorch_fid_weights(tmp_path / "weights.pth", tmp_path / "fid_inception.npz")
  loaded = load_fid_inception(tmp_path / "fid_inception.npz")
  expected = fid_inception_from_torch(state_dict)
  for variables in (converted, loaded):
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)


def _random_state_dict(seed=0):
  """A float32 state dict with pytorch-fid's names and PyTorch shapes (no torch needed)."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for path, shape in inception_module.variable_shapes().items():
    name, permutation = inception_module.torch_name(path)
    torch_shape = shape if permutation is None else tuple(np.asarray(shape)[np.argsort(permutation)])
    state_dict[name] = rng.standard_normal(torch_shape).astype(np.float32)
  return state_dict


def test_state_dict_conversion_round_trip_and_npz(tmp_path):
  state_dict = _random_state_dict()
  assert len(state_dict) == 472  # 94 BasicConv2d x (conv + 4 batch-norm arrays) + fc weight and bias
  assert state_dict["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
  variables = fid_inception_from_torch({**state_dict, "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)})
  assert variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
  assert variables["params"]["fc"]["kernel"].shape == (2048, 1008)
  np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state_dict["fc.weight"].T)
  np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"])
  round_trip = fid_inception_to_torch(variables)
  assert round_trip.keys() == state_dict.keys()
  for name, value in state_dict.items():
    np.testing.assert_array_equal(round_trip[name], value)
  save_fid_inception(tmp_path / "fid_inception.npz", variables)
  loaded = load_fid_inception(tmp_path / "fid_inception.npz")
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)


def test_random_init_has_the_converted_structure():
  variables = init_fid_inception(seed=0)
  expected = fid_inception_from_torch(_random_state_dict())
  assert jax.tree.structure(variables) == jax.tree.structure(expected)
  assert all(a.shape == b.shape and a.dtype == jnp.float32
             for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)))


def test_conversion_errors_name_the_entries(tmp_path):
  state_dict = _random_state_dict()
  broken = dict(state_dict)
  del broken["Mixed_5b.branch1x1.conv.weight"]
  broken["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  broken["fc.weight"] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError, match=(r"missing Mixed_5b\.branch1x1\.conv\.weight .*fc\.weight: expected shape "
                                        r"\(1008, 2048\), got \(1000, 2048\).*unexpected "
                                        r"AuxLogits\.fc\.weight")):
    fid_inception_from_torch(broken)
  with pytest.raises(FileNotFoundError, match=r"Nothing is downloaded at run time"):
    load_fid_inception(tmp_path / "missing.npz")


def test_input_checks():
  variables = {"params": {}, "batch_stats": {}}
  with pytest.raises(ValueError, match=r"at least 75x75, got \(74, 80\)"):
    FIDInceptionV3(resize_input=False).apply(variables, jnp.zeros((1, 74, 80, 3), jnp.float32))
  with pytest.raises(ValueError, match=r"C in \(1, 3\), got shape \(1, 8, 8, 2\)"):
    fid_inception_features(variables, jnp.zeros((1, 8, 8, 2), jnp.float32))
  with pytest.raises(ValueError, match=r"image_range must be \(lo, hi\) with hi > lo"):
    fid_inception_features(variables, jnp.zeros((1, 8, 8, 1), jnp.float32), image_range=(1.0, 1.0))
