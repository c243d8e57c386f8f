"""Random inpainting masks: thick irregular strokes or boxes, as the paper's inpainting data.

The paper trains its inpainting LDM with LaMa's synthetic masks (Suvorov et al. 2022; appendix
"Inpainting" of the LDM paper), those of LaMa's big model (configs/training/data/
abl-04-256-mh-dist.yaml): each mask is, with equal probability, either
  strokes  1..5 strokes, each of 1..5 connected straight segments of length 10..209 px and
           width 5..104 px with round ends; a segment's angle is 0.01 + an integer in 0..3
           radians (mirrored for every other stroke), its end clipped to the image;
  boxes    1..4 axis-aligned boxes, sides 30..149 px, at least 10 px from the border;
with lengths in pixels of a 256 px image, scaled here to `size`. Unlike LaMa's training masks,
ours keep their coverage within [MIN_COVERAGE, MAX_COVERAGE]: a mask outside is redrawn, and
after _ATTEMPTS misses a random square of a quarter of the image is used, so no mask is
empty or whole.
"""

import functools
import math

import numpy as np

MIN_COVERAGE, MAX_COVERAGE = 0.05, 0.6
MIN_SIZE = 4

_REFERENCE_SIZE = 256  # LaMa's sizes below are in pixels of a 256 px image
_STROKES = (1, 5)      # inclusive ranges
_SEGMENTS = (1, 5)
_ANGLES = 4            # segment angle 0.01 + integers(_ANGLES) radians
_LENGTH = (10, 210)    # half-open ranges, as integers(low, high)
_WIDTH = (5, 105)
_BOXES = (1, 4)
_BOX_SIDE = (30, 150)
_BOX_MARGIN = 10
_ATTEMPTS = 20
_FALLBACK_COVERAGE = 0.25


def inpainting_mask(size, rng):
  """float32 (size, size, 1): 1 where the image is to be filled, 0 where it is kept.

  Args:
    size: the image side, >= MIN_SIZE.
    rng: a np.random.Generator, the only source of randomness.
  """
  size = int(size)
  if size < MIN_SIZE:
    raise ValueError(f'inpainting mask size must be >= {MIN_SIZE}, got {size}')
  for _ in range(_ATTEMPTS):
    draw = stroke_mask if rng.random() < 0.5 else box_mask
    mask = draw(size, rng)
    if MIN_COVERAGE <= mask.mean() <= MAX_COVERAGE:
      return mask.astype(np.float32)[:, :, None]
  return _fallback_square(size, rng).astype(np.float32)[:, :, None]


def stroke_mask(size, rng):
  """bool (size, size): LaMa's thick irregular strokes, scaled to `size`."""
  scale = size / _REFERENCE_SIZE
  mask = np.zeros((size, size), bool)
  for stroke in range(int(rng.integers(_STROKES[0], _STROKES[1] + 1))):
    start = np.array([rng.integers(size), rng.integers(size)], np.float32)  # (x, y)
    for _ in range(int(rng.integers(_SEGMENTS[0], _SEGMENTS[1] + 1))):
      angle = 0.01 + float(rng.integers(_ANGLES))
      if stroke % 2 == 0:
        angle = 2 * math.pi - angle
      length = float(rng.integers(*_LENGTH)) * scale
      width = float(rng.integers(*_WIDTH)) * scale
      end = np.clip(start + length * np.array([math.sin(angle), math.cos(angle)], np.float32),
                    0, size)
      _draw_segment(mask, start, end, width / 2)
      start = end
  return mask


def box_mask(size, rng):
  """bool (size, size): LaMa's random boxes, scaled to `size`."""
  scale = size / _REFERENCE_SIZE
  margin = round(_BOX_MARGIN * scale)
  min_side = max(1, round(_BOX_SIDE[0] * scale))
  max_side = max(min_side + 1, min(round(_BOX_SIDE[1] * scale), size - 2 * margin))
  mask = np.zeros((size, size), bool)
  for _ in range(int(rng.integers(_BOXES[0], _BOXES[1] + 1))):
    height, width = (int(side) for side in rng.integers(min_side, max_side, 2))
    top = int(rng.integers(margin, max(margin, size - margin - height) + 1))
    left = int(rng.integers(margin, max(margin, size - margin - width) + 1))
    mask[top:top + height, left:left + width] = True
  return mask


def _draw_segment(mask, start, end, radius):
  """Sets the pixels of `mask` within `radius` of the segment start-end (float32 (x, y) points).

  Only the segment's bounding box, grown by the radius, is measured: a pixel outside it is farther
  than the radius in one coordinate alone. Squared distances are compared, since np.hypot costs
  more than the rest together. With both, utkface_inpaint's pipeline at 256 px gives twice the
  images/s; at 64 px, where each numpy call is mostly overhead, the gain is within noise
  (benchmarks/README.md, input pipeline).
  """
  size = mask.shape[0]
  (x0, y0), (x1, y1) = start.tolist(), end.tolist()
  top, left = (max(0, math.floor(min(a, b) - radius)) for a, b in ((y0, y1), (x0, x1)))
  bottom, right = (min(size, math.ceil(max(a, b) + radius) + 1) for a, b in ((y0, y1), (x0, x1)))
  if top >= bottom or left >= right:
    return
  window = (slice(top, bottom), slice(left, right))
  rows, cols = (grid[window] for grid in _pixel_centres(size))
  direction_x, direction_y = end - start
  length_sq = direction_x * direction_x + direction_y * direction_y
  if length_sq == 0:
    t = 0
  else:
    t = np.clip(((cols - start[0]) * direction_x + (rows - start[1]) * direction_y) / length_sq,
                0.0, 1.0)
  offset_x, offset_y = cols - (start[0] + t * direction_x), rows - (start[1] + t * direction_y)
  mask[window] |= offset_x * offset_x + offset_y * offset_y <= np.float32(radius) ** 2


@functools.lru_cache(maxsize=8)
def _pixel_centres(size):
  """float32 (2, size, size), read-only: each pixel's row and column (pixel centres at integers)."""
  grid = np.mgrid[0:size, 0:size].astype(np.float32)
  grid.flags.writeable = False
  return grid


def _fallback_square(size, rng):
  """bool (size, size): a square of about _FALLBACK_COVERAGE of the image, placed at random."""
  side = max(1, round(size * math.sqrt(_FALLBACK_COVERAGE)))
  top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
  mask = np.zeros((size, size), bool)
  mask[top:top + side, left:left + side] = True
  return mask
