"""Built-in shapes dataset: coloured shapes on pale backgrounds, no files.

Every example is a pure function of (seed, index): `np.random.default_rng([seed,
index])` draws it, so any index can be read in any order, in any process.

An example holds 1 to `MAX_OBJECTS` shapes of distinct colours. Objects are
sorted by size, largest first, and drawn in that order, so a later (smaller)
object covers an earlier one where they overlap.

Record keys (S = image_size):
  image         uint8 (S, S, 3)
  label         int32 scalar: shape kind (index into SHAPES) of object 0,
                the largest
  caption       str, e.g. "a red circle left of a blue square"
  boxes         float32 (MAX_OBJECTS, 5): rows (class, x0, y0, x1, y1) with
                class = shape kind and coordinates in [0, 1] of the object's
                own pixels (before occlusion), x1/y1 exclusive (pixel edges).
                Rows past the number of objects are all BOX_PADDING (-1); a row
                is valid iff its class >= 0. Valid rows come first, in object
                order.
  segmentation  int32 (S, S): 0 = background, k + 1 = shape kind k of the
                pixel's topmost object

Caption grammar, with relations taken from the centres of the boxes:
  1 object:  "a red circle"
  2 objects: "a red circle left of a blue square"
  3 objects: "a red circle left of a blue square and a green ring below the
             red circle" (object 2 is related to object 0)
The relation of A to B is horizontal when |dx| >= |dy| ("left of" if A's centre
has the smaller x, else "right of"), otherwise vertical ("above" if A's centre
has the smaller y, image rows growing downwards, else "below"). Articles follow
the colour: "an orange ring".
"""

import functools

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'ring')
NUM_CLASSES = len(SHAPES)
COLORS = {
    'red': (220, 40, 40),
    'green': (40, 160, 60),
    'blue': (40, 80, 220),
    'yellow': (240, 200, 30),
    'purple': (140, 60, 180),
    'orange': (245, 130, 30),
    'cyan': (30, 180, 200),
    'black': (30, 30, 30),
}
COLOR_NAMES = tuple(COLORS)
MAX_OBJECTS = 3
BOX_PADDING = -1.0

# Object side as a fraction of the image side: 14..30 px at 64 px.
_MIN_SIDE, _MAX_SIDE = 0.22, 0.47
_PLACEMENT_TRIES = 30
_RING_INNER = 0.55
_STAR_INNER = 0.45
_STAR_POINTS = 5


@functools.lru_cache(maxsize=8)
def _pixel_centres(image_size):
  """(ys, xs) float32 grids of pixel centres, in pixels."""
  coords = np.arange(image_size, dtype=np.float32) + 0.5
  ys, xs = np.meshgrid(coords, coords, indexing='ij')
  ys.setflags(write=False)
  xs.setflags(write=False)
  return ys, xs


def _star_mask(dx, dy, r):
  """Inside a 5-pointed star of outer radius r, one point straight up."""
  sector = 2 * np.pi / _STAR_POINTS
  angle = np.arctan2(dx, -dy)  # 0 at the top.
  phi = np.abs(np.mod(angle, sector) - sector / 2)
  phi = sector / 2 - phi  # Angle from the nearest outer point.
  rho = np.hypot(dx, dy)
  px, py = rho * np.cos(phi), rho * np.sin(phi)
  # Edge from the outer point A = (r, 0) to the inner point B; inside is the
  # origin's side of it.
  bx = _STAR_INNER * r * np.cos(sector / 2)
  by = _STAR_INNER * r * np.sin(sector / 2)
  return (bx - r) * py - by * (px - r) >= 0


def _local_mask(name, dx, dy, r):
  """Inside test of shape `name` for offsets (dx, dy) from its centre."""
  if name == 'circle':
    return dx * dx + dy * dy <= r * r
  if name == 'square':
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if name == 'triangle':
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
  if name == 'diamond':
    return np.abs(dx) + np.abs(dy) <= r
  if name == 'star':
    return _star_mask(dx, dy, r)
  if name == 'ring':
    dist2 = dx * dx + dy * dy
    return (dist2 <= r * r) & (dist2 >= (_RING_INNER * r) ** 2)
  raise ValueError(f'unknown shape {name!r}')


def shape_mask(kind, cx, cy, r, image_size):
  """Boolean (S, S) mask of shape `kind` centred at (cx, cy), half-side r."""
  ys, xs = _pixel_centres(image_size)
  # Every shape lies within its square of half-side r: test only that window.
  y0, y1 = max(int(cy - r), 0), min(int(np.ceil(cy + r)) + 1, image_size)
  x0, x1 = max(int(cx - r), 0), min(int(np.ceil(cx + r)) + 1, image_size)
  mask = np.zeros((image_size, image_size), bool)
  mask[y0:y1, x0:x1] = _local_mask(
      SHAPES[kind], xs[y0:y1, x0:x1] - cx, ys[y0:y1, x0:x1] - cy, r)
  return mask


def _background(rng, image_size):
  """A pale solid colour or a soft two-colour gradient, float32 (S, S, 3)."""
  first = rng.uniform(175, 250, size=3)
  if rng.random() < 0.5:
    return np.broadcast_to(
        first, (image_size, image_size, 3)).astype(np.float32)
  second = rng.uniform(175, 250, size=3)
  angle = rng.uniform(0, 2 * np.pi)
  ys, xs = _pixel_centres(image_size)
  t = xs * np.cos(angle) + ys * np.sin(angle)
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  return (first * (1 - t[..., None]) + second * t[..., None]).astype(np.float32)


def _separated(centre, half, centres, halves):
  """True if the shape is apart from each placed one along x or y by 3/4 of
  their summed half-sides, which keeps overlaps small and relations clear."""
  return all(np.max(np.abs(centre - c)) >= 0.75 * (half + h)
             for c, h in zip(centres, halves))


def _place(rng, halves, image_size):
  """Centres, largest shape first, inside the image and apart from the others.

  A shape that finds no free spot in 10 tries shrinks by 10% (at most twice).
  """
  centres, placed = [], []
  for half in halves:
    for attempt in range(_PLACEMENT_TRIES):
      if attempt and attempt % 10 == 0:
        half *= 0.9
      centre = rng.uniform(half, image_size - half, size=2)
      if _separated(centre, half, centres, placed):
        break
    centres.append(centre)
    placed.append(half)
  return np.stack(centres), np.array(placed)


def _mask_box(mask, image_size):
  """(x0, y0, x1, y1) in [0, 1] of the mask's pixels, x1/y1 exclusive."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  return np.array(
      [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32) / image_size


def relation(box_a, box_b):
  """Where box A sits relative to box B: left of, right of, above, below."""
  dx = (box_a[0] + box_a[2]) / 2 - (box_b[0] + box_b[2]) / 2
  dy = (box_a[1] + box_a[3]) / 2 - (box_b[1] + box_b[3]) / 2
  if abs(dx) >= abs(dy):
    return 'left of' if dx < 0 else 'right of'
  return 'above' if dy < 0 else 'below'


def _indefinite(name):
  """'a red circle', 'an orange ring'."""
  return ('an ' if name[0] in 'aeiou' else 'a ') + name


def caption(names, boxes):
  """Caption for objects named e.g. 'red circle' with boxes (x0, y0, x1, y1)."""
  text = _indefinite(names[0])
  if len(names) >= 2:
    text += f' {relation(boxes[0], boxes[1])} {_indefinite(names[1])}'
  if len(names) >= 3:
    text += (f' and {_indefinite(names[2])} {relation(boxes[2], boxes[0])}'
             f' the {names[0]}')
  return text


def make_example(seed, index, image_size=64):
  """The example at `index` of the set drawn with `seed` (see module doc)."""
  rng = np.random.default_rng([seed, index])
  num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
  kinds = rng.integers(0, NUM_CLASSES, size=num_objects)
  colors = rng.choice(len(COLOR_NAMES), size=num_objects, replace=False)
  sides = np.sort(rng.uniform(_MIN_SIDE, _MAX_SIDE, size=num_objects))[::-1]
  centres, halves = _place(rng, sides * image_size / 2, image_size)
  image = _background(rng, image_size)
  segmentation = np.zeros((image_size, image_size), np.int32)
  boxes = np.full((MAX_OBJECTS, 5), BOX_PADDING, np.float32)
  names = []
  for i, (kind, color) in enumerate(zip(kinds, colors)):
    (cx, cy), r = centres[i], halves[i]
    mask = shape_mask(kind, cx, cy, r, image_size)
    if not mask.any():  # Only at tiny image sizes.
      mask[min(int(cy), image_size - 1), min(int(cx), image_size - 1)] = True
    image[mask] = COLORS[COLOR_NAMES[color]]
    segmentation[mask] = kind + 1
    boxes[i, 0] = kind
    boxes[i, 1:] = _mask_box(mask, image_size)
    names.append(f'{COLOR_NAMES[color]} {SHAPES[kind]}')
  return {
      'image': np.round(image).astype(np.uint8),
      'label': np.int32(kinds[0]),
      'caption': caption(names, boxes[:num_objects, 1:]),
      'boxes': boxes,
      'segmentation': segmentation,
  }


def color_map(example):
  """int32 (S, S) colour index of each pixel of an example from make_example:
  0 = background, c + 1 = colour COLOR_NAMES[c] of the pixel's topmost object.

  Shapes are drawn in their exact COLORS values and no background pixel can
  take one (backgrounds are pale in every channel), so the colour of each
  shape pixel (segmentation > 0) is read back from the image. Raises
  ValueError for an image that was changed since (resized, blurred).
  """
  image = np.asarray(example['image']).astype(np.int32)
  foreground = np.asarray(example['segmentation']) > 0
  rgb = (image[..., 0] << 16) | (image[..., 1] << 8) | image[..., 2]
  palette = [(r << 16) | (g << 8) | b for r, g, b in COLORS.values()]
  colors = np.zeros(rgb.shape, np.int32)
  for c, value in enumerate(palette):
    colors[foreground & (rgb == value)] = c + 1
  if np.any(foreground & (colors == 0)):
    raise ValueError('shape pixels of a colour not in COLORS: the image was '
                     'changed after make_example drew it')
  return colors


class SyntheticShapes:
  """Random-access source of `size` shapes examples, deterministic by seed."""

  def __init__(self, size, seed, image_size=64):
    if size <= 0:
      raise ValueError(f'size must be positive, got {size}')
    self.size = int(size)
    self.seed = int(seed)
    self.image_size = int(image_size)

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f'index {index} out of range for {self.size} examples')
    return make_example(self.seed, index, self.image_size)

  def __repr__(self):
    return (f'SyntheticShapes(size={self.size}, seed={self.seed}, '
            f'image_size={self.image_size})')
