"""Whether conditional samples of the synthetic shapes obey their conditions, read from per-pixel maps
(numpy only): the shapes parser's output for samples, or a dataset's own maps.

Maps are int arrays (N, S, S): shape_map 0 = background, k + 1 = synthetic.SHAPES[k]; colour_map
0 = background, c + 1 = synthetic.COLOR_NAMES[c] (see shapes_parser.py).

  text_adherence      the objects a caption names (and the relations it states) are there
  layout_adherence    mean IoU of each requested box with the best detected object of its class
  semantic_accuracy   pixel accuracy of the shape map against the requested segmentation
  class_accuracy      fraction of predicted labels equal to the requested ones

Objects are the connected components (8-neighbourhood) of the pixels of one colour; each takes the
shape class most of its pixels have, and components smaller than MIN_OBJECT_FRACTION of the image
(specks at edges of a generated shape) are ignored. A shape drawn by make_example covers at least
about 40 of 4096 pixels at 64 px.
"""

import collections
import dataclasses
import itertools
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from latent_diffusion.data import synthetic

MIN_OBJECT_FRACTION = 0.004  # 16 pixels at 64x64
RELATIONS = ('left of', 'right of', 'above', 'below')
_EIGHT_NEIGHBOURS = np.ones((3, 3), bool)
_SHAPE_INDEX = {name: k for k, name in enumerate(synthetic.SHAPES)}
_COLOUR_INDEX = {name: c for c, name in enumerate(synthetic.COLOR_NAMES)}


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """One object found in an image's maps."""
  colour: int  # index into synthetic.COLOR_NAMES
  shape: int  # index into synthetic.SHAPES
  mask: np.ndarray  # bool (S, S)
  box: np.ndarray  # float32 (4,): x0, y0, x1, y1 in [0, 1] of the mask's pixels, x1 / y1 exclusive


class ParsedCaption(NamedTuple):
  """objects: (colour, shape) index pairs in caption order; relations: (i, relation, j) triples, object
  i <relation> object j, with relation one of RELATIONS."""
  objects: tuple[tuple[int, int], ...]
  relations: tuple[tuple[int, str, int], ...]


def _check_maps(shape_maps, colour_maps):
  shape_maps, colour_maps = np.asarray(shape_maps), np.asarray(colour_maps)
  if shape_maps.ndim != 3 or shape_maps.shape != colour_maps.shape:
    raise ValueError(f'shape_maps and colour_maps must both be (N, S, S), got {shape_maps.shape} and '
                     f'{colour_maps.shape}')
  return shape_maps, colour_maps


def mask_box(mask: np.ndarray) -> np.ndarray:
  """float32 (x0, y0, x1, y1) in [0, 1] of a non-empty (H, W) mask's pixels, x1 / y1 exclusive
  (pixel edges, as synthetic.py's boxes)."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  height, width = mask.shape
  return np.array([cols[0] / width, rows[0] / height, (cols[-1] + 1) / width, (rows[-1] + 1) / height],
                  np.float32)


def detect_image_objects(shape_map, colour_map, min_pixels=None) -> list[DetectedObject]:
  """The objects of one image's (S, S) maps, ordered by colour, then by first pixel."""
  shape_map, colour_map = np.asarray(shape_map), np.asarray(colour_map)
  if min_pixels is None:
    min_pixels = max(1, round(MIN_OBJECT_FRACTION * shape_map.size))
  objects = []
  for colour in range(1, len(synthetic.COLOR_NAMES) + 1):
    same_colour = colour_map == colour
    if not same_colour.any():
      continue
    components, count = scipy.ndimage.label(same_colour, structure=_EIGHT_NEIGHBOURS)
    for component in range(1, count + 1):
      mask = components == component
      if mask.sum() < min_pixels:
        continue
      votes = np.bincount(shape_map[mask], minlength=synthetic.NUM_CLASSES + 1)[1:]
      if not votes.any():  # coloured pixels that the shape map calls background
        continue
      objects.append(DetectedObject(colour=colour - 1, shape=int(np.argmax(votes)), mask=mask,
                                    box=mask_box(mask)))
  return objects


def detect_objects(shape_maps, colour_maps, min_pixels=None) -> list[list[DetectedObject]]:
  """Per image of (N, S, S) maps, its list of DetectedObjects (see module doc); min_pixels defaults
  to MIN_OBJECT_FRACTION of the image."""
  shape_maps, colour_maps = _check_maps(shape_maps, colour_maps)
  return [detect_image_objects(s, c, min_pixels) for s, c in zip(shape_maps, colour_maps)]


def caption_objects(caption: str) -> ParsedCaption:
  """The objects and relations of a caption in synthetic.py's grammar:

    caption := object [relation object] {'and' object relation 'the' colour shape}
    object  := ('a' | 'an') colour shape

  e.g. "a red circle left of a blue square and a green ring below the red circle" gives objects
  ((red, circle), (blue, square), (green, ring)) and relations ((0, 'left of', 1), (2, 'below', 0)).
  Raises ValueError naming an unknown word, or the place where the caption leaves the grammar.
  """
  words = caption.split()
  known = {'a', 'an', 'the', 'and', 'left', 'right', 'of', 'above', 'below', *_SHAPE_INDEX, *_COLOUR_INDEX}
  for word in words:
    if word not in known:
      raise ValueError(f'caption {caption!r}: unknown word {word!r}')
  position = 0

  def fail(expected):
    found = repr(words[position]) if position < len(words) else 'the end'
    raise ValueError(f'caption {caption!r}: expected {expected} at word {position + 1}, found {found}')

  def take(allowed, expected):
    nonlocal position
    if position >= len(words) or words[position] not in allowed:
      fail(expected)
    position += 1
    return words[position - 1]

  def colour_shape():
    colour = take(_COLOUR_INDEX, 'a colour')
    return _COLOUR_INDEX[colour], _SHAPE_INDEX[take(_SHAPE_INDEX, 'a shape')]

  def relation():
    word = take(('left', 'right', 'above', 'below'), 'a relation')
    if word in ('left', 'right'):
      take(('of',), "'of'")
      return f'{word} of'
    return word

  def at_relation():
    return position < len(words) and words[position] in ('left', 'right', 'above', 'below')

  take(('a', 'an'), "'a' or 'an'")
  objects, relations = [colour_shape()], []
  if at_relation():
    stated = relation()
    take(('a', 'an'), "'a' or 'an'")
    objects.append(colour_shape())
    relations.append((0, stated, 1))
  while position < len(words):
    take(('and',), "'and' or the end")
    take(('a', 'an'), "'a' or 'an'")
    objects.append(colour_shape())
    stated = relation()
    take(('the',), "'the'")
    reference = colour_shape()
    earlier = [i for i, obj in enumerate(objects[:-1]) if obj == reference]
    if not earlier:
      raise ValueError(f'caption {caption!r}: "the {synthetic.COLOR_NAMES[reference[0]]} '
                       f'{synthetic.SHAPES[reference[1]]}" names no earlier object')
    relations.append((len(objects) - 1, stated, earlier[0]))
  return ParsedCaption(tuple(objects), tuple(relations))


def _relations_hold(objects, relations, detected) -> bool:
  """Whether some one-to-one assignment of detected objects to the prompted ones (same colour and
  shape) satisfies every relation, judged from box centres as synthetic.relation does."""
  by_key = collections.defaultdict(list)
  for obj in detected:
    by_key[(obj.colour, obj.shape)].append(obj)
  slots = collections.defaultdict(list)  # key -> prompted object indices
  for i, key in enumerate(objects):
    slots[key].append(i)
  keys = list(slots)
  for choice in itertools.product(*(itertools.permutations(by_key[k], len(slots[k])) for k in keys)):
    box = {}
    for key, picked in zip(keys, choice):
      box.update({i: obj.box for i, obj in zip(slots[key], picked)})
    if all(synthetic.relation(box[i], box[j]) == stated for i, stated, j in relations):
      return True
  return False


def text_matches(shape_maps, colour_maps, captions, detected=None) -> tuple[np.ndarray, np.ndarray]:
  """Per sample: (objects_match, relations_match), bool (N,) each. objects_match: the multiset of
  detected (colour, shape) equals the caption's; relations_match: that, and every stated relation
  holds between the matching detected objects. `detected`: detect_objects of the maps, if at hand."""
  detected = detect_objects(shape_maps, colour_maps) if detected is None else detected
  if len(captions) != len(detected):
    raise ValueError(f'{len(captions)} captions for {len(detected)} images')
  objects_match = np.zeros(len(detected), bool)
  relations_match = np.zeros(len(detected), bool)
  for n, (found, caption) in enumerate(zip(detected, captions)):
    prompted = caption_objects(str(caption))
    objects_match[n] = (collections.Counter(prompted.objects)
                        == collections.Counter((obj.colour, obj.shape) for obj in found))
    relations_match[n] = objects_match[n] and _relations_hold(prompted.objects, prompted.relations, found)
  return objects_match, relations_match


def text_adherence(shape_maps, colour_maps, captions, detected=None) -> dict[str, float]:
  """{'objects': fraction of samples whose detected (colour, shape) multiset equals the caption's,
  'objects_and_relations': fraction that, in addition, satisfy every stated relation,
  'object_recall' / 'colour_recall': fraction of all prompted objects found with their colour and
  shape / with their colour (one detected object answers one prompted object)}: the recalls grade
  samples that the all-or-nothing fractions fail. `detected`: detect_objects of the maps, if at hand."""
  detected = detect_objects(shape_maps, colour_maps) if detected is None else detected
  objects_match, relations_match = text_matches(shape_maps, colour_maps, captions, detected)
  prompted_count = object_hits = colour_hits = 0
  for found, caption in zip(detected, captions):
    prompted = caption_objects(str(caption)).objects
    prompted_count += len(prompted)
    object_hits += sum((collections.Counter(prompted)
                        & collections.Counter((obj.colour, obj.shape) for obj in found)).values())
    colour_hits += sum((collections.Counter(colour for colour, _ in prompted)
                        & collections.Counter(obj.colour for obj in found)).values())
  return {'objects': float(np.mean(objects_match)), 'objects_and_relations': float(np.mean(relations_match)),
          'object_recall': object_hits / max(prompted_count, 1),
          'colour_recall': colour_hits / max(prompted_count, 1)}


def box_iou(a, b) -> float:
  """IoU of two (x0, y0, x1, y1) boxes."""
  width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  intersection = width * height
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
  return float(intersection / union) if union > 0 else 0.0


def box_ious(shape_maps, colour_maps, boxes, detected=None) -> np.ndarray:
  """float (N, R): for each requested box (row (class, x0, y0, x1, y1) of boxes (N, R, 5) with
  class >= 0) the best IoU with a detected object of that shape class, 0 if there is none; NaN for
  rows that request nothing. `detected`: detect_objects of the maps, if at hand."""
  boxes = np.asarray(boxes, np.float32)
  detected = detect_objects(shape_maps, colour_maps) if detected is None else detected
  if boxes.ndim != 3 or boxes.shape[0] != len(detected) or boxes.shape[2] != 5:
    raise ValueError(f'boxes must be ({len(detected)}, R, 5), got {boxes.shape}')
  ious = np.full(boxes.shape[:2], np.nan)
  for n, found in enumerate(detected):
    for r, (kind, *box) in enumerate(boxes[n]):
      if kind >= 0:
        ious[n, r] = max((box_iou(box, obj.box) for obj in found if obj.shape == int(kind)), default=0.0)
  return ious


def layout_adherence(shape_maps, colour_maps, boxes, detected=None) -> float:
  """Mean over the requested boxes of all samples of box_ious (see there)."""
  ious = box_ious(shape_maps, colour_maps, boxes, detected)
  requested = ~np.isnan(ious)
  if not requested.any():
    raise ValueError('no requested boxes (every row has class < 0)')
  return float(np.mean(ious[requested]))


def semantic_accuracy(shape_maps, requested_segmentation) -> float:
  """Fraction of pixels whose shape class equals the requested segmentation's, both (N, S, S)."""
  shape_maps, requested = np.asarray(shape_maps), np.asarray(requested_segmentation)
  if shape_maps.shape != requested.shape:
    raise ValueError(f'shape_maps {shape_maps.shape} and requested_segmentation {requested.shape} differ')
  return float(np.mean(shape_maps == requested))


def class_accuracy(predicted_labels, requested_labels) -> float:
  """Fraction of predicted labels (N,) equal to the requested ones (N,); NaN for N = 0."""
  predicted, requested = np.asarray(predicted_labels), np.asarray(requested_labels)
  if predicted.shape != requested.shape or predicted.ndim != 1:
    raise ValueError(f'predicted {predicted.shape} and requested {requested.shape} labels must both be (N,)')
  return float(np.mean(predicted == requested)) if len(predicted) else float('nan')
