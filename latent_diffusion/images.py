"""Image file boundary: [-1, 1] float arrays <-> uint8 PNG grids."""

import math
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float (..., H, W, C) -> uint8, rounding to nearest."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H', columns*W', C) uint8 image with white padding."""
  n, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
                 255, np.uint8)
  for index, image in enumerate(images):
    top = padding + (index // columns) * (height + padding)
    left = padding + (index % columns) * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


def save_grid(path: str | Path, images: np.ndarray, columns: int | None = None) -> Path:
  """Write [-1, 1] images (N, H, W, 3) as one PNG grid; returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(make_grid(to_uint8(images), columns)).save(path)
  return path
