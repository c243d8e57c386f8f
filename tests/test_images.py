"""Tests for images.py: float <-> uint8 conversion, grid layout and PNG writing."""

import numpy as np
import pytest
from PIL import Image

from latent_diffusion import images


def test_to_uint8_maps_range_endpoints_and_rounds_to_nearest():
  values = np.array([-1.0, 1.0, 0.0, 10.4 / 127.5 - 1, 10.6 / 127.5 - 1])
  np.testing.assert_array_equal(images.to_uint8(values), [0, 255, 128, 10, 11])
  assert images.to_uint8(values).dtype == np.uint8


def test_to_uint8_clips_out_of_range_values():
  np.testing.assert_array_equal(images.to_uint8(np.array([-3.0, -1.01, 1.01, 7.0])), [0, 0, 255, 255])


def test_to_uint8_inverts_the_pipelines_uint8_to_float_mapping():
  """The data pipeline maps uint8 u to u / 127.5 - 1: every byte value survives the round trip."""
  pixels = np.arange(256, dtype=np.uint8)
  as_float = pixels.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(images.to_uint8(as_float), pixels)


def test_make_grid_places_images_row_major_with_white_padding():
  tiles = np.stack([np.full((3, 4, 3), 10 * (i + 1), np.uint8) for i in range(5)])  # 5 tiles 3x4
  grid = images.make_grid(tiles, columns=2, padding=1)
  # 3 rows x 2 columns of (3 + 1) x (4 + 1) cells, plus the outer padding.
  assert grid.shape == (3 * 4 + 1, 2 * 5 + 1, 3) and grid.dtype == np.uint8
  for index in range(5):
    row, column = divmod(index, 2)
    top, left = 1 + row * 4, 1 + column * 5
    np.testing.assert_array_equal(grid[top:top + 3, left:left + 4], tiles[index])
  assert np.all(grid[0] == 255) and np.all(grid[:, 0] == 255)
  assert np.all(grid[9:12, 6:10] == 255)  # the empty sixth cell
  assert (grid != 255).sum() == 5 * 3 * 4 * 3


@pytest.mark.parametrize('count, shape', [(1, (1, 1)), (4, (2, 2)), (5, (2, 3)), (16, (4, 4))])
def test_make_grid_defaults_to_a_near_square_layout(count, shape):
  grid = images.make_grid(np.zeros((count, 8, 8, 1), np.uint8), padding=2)
  rows, columns = shape
  assert grid.shape == (rows * 10 + 2, columns * 10 + 2, 1)


def test_save_grid_writes_a_readable_png_of_the_grid_size(tmp_path):
  batch = np.random.default_rng(0).uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
  path = images.save_grid(tmp_path / 'new' / 'dir' / 'grid.png', batch, columns=3)
  assert path == tmp_path / 'new' / 'dir' / 'grid.png'
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.mode == 'RGB'
    assert image.size == (3 * 18 + 2, 2 * 18 + 2)  # (width, height) with the default padding 2
    pixels = np.asarray(image)
  np.testing.assert_array_equal(pixels[2:18, 2:18], images.to_uint8(batch[0]))
  np.testing.assert_array_equal(pixels[20:36, 38:54], images.to_uint8(batch[5]))
