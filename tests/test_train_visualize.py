"""The pictures of a training run: the loss curve (matplotlib, labelled axes) and image grids (Pillow)."""

import numpy as np
import PIL.Image
import pytest

from scoreflow.train import visualize


def test_loss_curve_has_labelled_axes_from_step_zero_and_drops_non_finite_losses():
  steps = np.arange(100, 1100, 100)
  losses = np.array([1.0, 0.5, np.nan, 0.3, np.inf, 0.2, 0.15, 0.12, 0.11, 0.1])
  figure = visualize.loss_curve_figure(steps, losses)
  (axes,) = figure.axes
  assert axes.get_xlabel() == "training step" and axes.get_ylabel() == "loss (log scale)"
  assert axes.get_yscale() == "log" and axes.get_xlim()[0] == 0  # The curve is read against step 0.
  x, y = axes.lines[0].get_data()
  np.testing.assert_array_equal(x, steps[np.isfinite(losses)])
  np.testing.assert_array_equal(y, losses[np.isfinite(losses)])
  assert len(axes.get_xticks()) >= 3 and len(axes.get_yticks()) >= 2
  # A linear axis keeps zero and negative losses (a log axis cannot show them).
  linear = visualize.loss_curve_figure([1, 2, 3], [0.5, 0.0, -0.1], log_scale=False).axes[0]
  assert linear.get_yscale() == "linear" and linear.lines[0].get_data()[1].tolist() == [0.5, 0.0, -0.1]


def test_save_loss_curve_writes_a_png_atomically(tmp_path, monkeypatch):
  path = tmp_path / "loss.png"
  visualize.save_loss_curve(path, [10, 20, 30], [1.0, 0.5, 0.25])
  with PIL.Image.open(path) as image:
    assert image.format == "PNG" and image.size == (640, 400)
    pixels = np.asarray(image.convert("L"))
  assert pixels.min() < 100 and pixels.max() > 200  # Drawn on, not blank.
  before = path.read_bytes()

  def failing_savefig(self, *args, **kwargs):
    raise OSError("disk full")

  from matplotlib.figure import Figure
  monkeypatch.setattr(Figure, "savefig", failing_savefig)
  with pytest.raises(OSError, match="disk full"):
    visualize.save_loss_curve(path, [10, 20], [2.0, 1.0])
  assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
