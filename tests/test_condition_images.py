"""Tests for condition_images.py: each condition drawn where it belongs, [condition | sample] grids."""

import numpy as np

from latent_diffusion import condition_images


def test_caption_panel_writes_dark_text_on_white():
  panel = condition_images.caption_panel('a red circle left of a blue square', 128, 128)
  assert panel.shape == (128, 128, 3)
  assert (panel < 100).any() and (panel == 255).mean() > 0.7


def test_boxes_are_outlined_where_they_are_and_nowhere_else():
  panel = condition_images.boxes_panel(np.array([[1, 0.5, 0.5, 1.0, 1.0], [-1, 0, 0, 0, 0]]), 100, 100)
  inked = (panel != 255).any(axis=-1)
  assert inked[50:, 50:].any()
  assert not inked[:45].any() and not inked[:, :45].any()


def test_segmentation_panel_gives_each_class_its_colour_at_the_display_size():
  segmentation = np.zeros((4, 4), np.int32)
  segmentation[:2, :2] = 3
  panel = condition_images.segmentation_panel(segmentation, 8, 8)
  np.testing.assert_array_equal(panel[0, 0], condition_images.PALETTE[3])
  np.testing.assert_array_equal(panel[7, 7], condition_images.PALETTE[0])


def test_masked_panel_blanks_the_region_to_fill():
  image = np.ones((4, 4, 3), np.float32)
  mask = np.zeros((4, 4, 1), np.float32)
  mask[:2] = 1
  panel = condition_images.masked_panel(image, mask, 4, 4)
  assert (panel[:2] == 128).all() and (panel[2:] == 255).all()


def test_conditional_grid_puts_several_panels_before_each_sample_in_order():
  samples = np.zeros((2, 128, 128, 3), np.float32)
  first, second = np.full((2, 128, 128, 3), 7, np.uint8), np.full((2, 128, 128, 3), 9, np.uint8)
  grid = condition_images.conditional_grid(samples, [first, second], pairs_per_row=2)
  assert grid.shape == (2 + 128 + 2, 6 * (128 + 2) + 2, 3)
  columns = [grid[2:130, 2 + 130 * i:130 * (i + 1)] for i in range(6)]
  for i, value in enumerate([7, 9, 128] * 2):
    assert (columns[i] == value).all(), i


def test_conditional_grid_pairs_each_condition_with_its_enlarged_sample():
  samples = np.zeros((3, 16, 16, 3), np.float32)
  panels = np.full((3, 128, 128, 3), 7, np.uint8)
  grid = condition_images.conditional_grid(samples, [panels], pairs_per_row=3)
  assert grid.shape == (2 + 128 + 2, 6 * (128 + 2) + 2, 3)
  assert (grid[2:130, 2:130] == 7).all() and (grid[2:130, 132:260] == 128).all()
