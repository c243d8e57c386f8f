"""Tests for the random inpainting masks (LaMa's thick strokes and boxes)."""

import numpy as np
import pytest

from latent_diffusion.data import masks


def is_union_of_boxes(mask):
  """Whether a 2-D mask could be a few axis-aligned boxes: rows and columns take few patterns.

  Up to 4 boxes change the row pattern at most 8 times; a stroke's round ends and slanted
  segments change it on nearly every row.
  """
  return len(np.unique(mask, axis=0)) <= 9 and len(np.unique(mask.T, axis=0)) <= 9


@pytest.mark.parametrize('size', [8, 32, 64])
def test_coverage_stays_in_range_over_many_seeds(size):
  coverage = np.array([masks.inpainting_mask(size, np.random.default_rng(s)).mean()
                       for s in range(300)])
  assert coverage.min() >= masks.MIN_COVERAGE and coverage.max() <= masks.MAX_COVERAGE
  assert coverage.std() > 0.05  # Masks of many sizes, not one fixed shape.


def test_mask_is_float32_size_by_size_by_one_of_zeros_and_ones():
  mask = masks.inpainting_mask(64, np.random.default_rng(0))
  assert mask.shape == (64, 64, 1) and mask.dtype == np.float32
  assert set(np.unique(mask).tolist()) == {0.0, 1.0}


def test_mask_is_deterministic_given_the_seed_and_differs_across_seeds():
  first = masks.inpainting_mask(64, np.random.default_rng(5))
  np.testing.assert_array_equal(masks.inpainting_mask(64, np.random.default_rng(5)), first)
  assert all(not np.array_equal(masks.inpainting_mask(64, np.random.default_rng(s)), first)
             for s in range(6, 12))


def test_strokes_and_boxes_both_appear_over_seeds():
  kinds = [is_union_of_boxes(masks.inpainting_mask(64, np.random.default_rng(s))[..., 0])
           for s in range(200)]
  boxes = np.mean(kinds)
  assert 0.2 < boxes < 0.8  # Each kind is drawn with probability 1/2.


def test_box_masks_are_unions_of_boxes_and_stroke_masks_are_not():
  for seed in range(40):
    assert is_union_of_boxes(masks.box_mask(64, np.random.default_rng(seed)))
  strokes = [is_union_of_boxes(masks.stroke_mask(64, np.random.default_rng(s))) for s in range(40)]
  assert np.mean(strokes) < 0.1


def test_boxes_keep_the_scaled_margin_from_the_border():
  for seed in range(40):
    mask = masks.box_mask(256, np.random.default_rng(seed))
    rows, cols = np.nonzero(mask)
    assert rows.min() >= 10 and cols.min() >= 10
    assert rows.max() <= 245 and cols.max() <= 245


def test_strokes_are_thick_at_the_papers_scale():
  # LaMa's thick strokes: widths 5..104 px at 256 px; a mask of them has wide runs of ones.
  widest = max(np.max(np.sum(masks.stroke_mask(256, np.random.default_rng(s)), axis=1))
               for s in range(10))
  assert widest > 40


def test_too_small_size_raises_value_error():
  with pytest.raises(ValueError, match='>= 4, got 3'):
    masks.inpainting_mask(3, np.random.default_rng(0))


def test_a_segment_sets_exactly_the_pixels_within_its_radius():
  # Against the definition measured in float64 over the whole image: the bounding-box window and the
  # squared float32 distances may only disagree on pixels within 1e-3 px of the stroke's edge.
  # Segments run past the borders, lie outside the image, or have zero length.
  rng = np.random.default_rng(0)
  rows, cols = np.mgrid[0:32, 0:32].astype(np.float64)
  for _ in range(300):
    start, end = (rng.uniform(-10, 42, 2).astype(np.float32) for _ in range(2))
    if rng.random() < 0.1:
      end = start.copy()
    radius = float(rng.uniform(0.3, 12))
    mask = np.zeros((32, 32), bool)
    masks._draw_segment(mask, start, end, radius)  # pylint: disable=protected-access
    a, b = start.astype(np.float64), end.astype(np.float64)
    direction = b - a
    t = np.clip(((cols - a[0]) * direction[0] + (rows - a[1]) * direction[1])
                / max(direction @ direction, 1e-300), 0, 1)
    distance = np.hypot(cols - a[0] - t * direction[0], rows - a[1] - t * direction[1])
    clear = np.abs(distance - radius) > 1e-3
    np.testing.assert_array_equal(mask[clear], (distance <= radius)[clear])
