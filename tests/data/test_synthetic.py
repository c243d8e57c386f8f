"""Tests for the built-in shapes dataset."""

import re

import numpy as np
import pytest

from latent_diffusion.data import synthetic

NUM_CHECKED = 60
_NAME = r'(\w+) (\w+)'
CAPTION_RE = re.compile(
    rf'^an? {_NAME}(?: (left of|right of|above|below) an? {_NAME})?'
    rf'(?: and an? {_NAME} (left of|right of|above|below) the {_NAME})?$')


def valid_boxes(example):
  boxes = example['boxes']
  return boxes[boxes[:, 0] >= 0]


def expected_relation(box_a, box_b):
  """The documented rule, written independently of the module's helper."""
  ax, ay = (box_a[1] + box_a[3]) / 2, (box_a[2] + box_a[4]) / 2
  bx, by = (box_b[1] + box_b[3]) / 2, (box_b[2] + box_b[4]) / 2
  if abs(ax - bx) >= abs(ay - by):
    return 'left of' if ax < bx else 'right of'
  return 'above' if ay < by else 'below'


def parse_caption(caption):
  """[(colour, shape), ...] and the relations between objects (0,1), (2,0)."""
  match = CAPTION_RE.match(caption)
  assert match, caption
  g = match.groups()
  objects = [(g[0], g[1])]
  relations = {}
  if g[2]:
    relations[(0, 1)] = g[2]
    objects.append((g[3], g[4]))
  if g[5]:
    objects.append((g[5], g[6]))
    relations[(2, 0)] = g[7]
    assert (g[8], g[9]) == objects[0], caption
  return objects, relations


@pytest.fixture(scope='module')
def examples():
  source = synthetic.SyntheticShapes(NUM_CHECKED, seed=3)
  return [source[i] for i in range(NUM_CHECKED)]


def test_constants_describe_shapes_and_colours():
  assert 4 <= len(synthetic.SHAPES) <= 6
  assert synthetic.NUM_CLASSES == len(synthetic.SHAPES)
  assert 6 <= len(synthetic.COLORS) <= 8
  assert len(set(synthetic.COLORS.values())) == len(synthetic.COLORS)


def test_same_seed_and_index_give_identical_examples():
  first = synthetic.SyntheticShapes(100, seed=7)[42]
  again = synthetic.SyntheticShapes(100, seed=7)[42]
  assert first['caption'] == again['caption']
  for key in ('image', 'label', 'boxes', 'segmentation'):
    np.testing.assert_array_equal(first[key], again[key])


def test_different_seeds_or_indices_give_different_images():
  a = synthetic.SyntheticShapes(100, seed=0)
  b = synthetic.SyntheticShapes(100, seed=1)
  assert not np.array_equal(a[5]['image'], b[5]['image'])
  assert not np.array_equal(a[5]['image'], a[6]['image'])


def test_reading_order_does_not_change_examples():
  source = synthetic.SyntheticShapes(20, seed=0)
  forward = [source[i]['image'] for i in range(20)]
  backward = [source[i]['image'] for i in reversed(range(20))][::-1]
  for f, b in zip(forward, backward):
    np.testing.assert_array_equal(f, b)


@pytest.mark.parametrize('image_size', [32, 64])
def test_example_keys_shapes_and_dtypes(image_size):
  example = synthetic.SyntheticShapes(10, seed=0, image_size=image_size)[3]
  assert set(example) == {'image', 'label', 'caption', 'boxes', 'segmentation'}
  assert example['image'].shape == (image_size, image_size, 3)
  assert example['image'].dtype == np.uint8
  assert example['label'].dtype == np.int32 and example['label'].shape == ()
  assert isinstance(example['caption'], str)
  assert example['boxes'].shape == (synthetic.MAX_OBJECTS, 5)
  assert example['boxes'].dtype == np.float32
  assert example['segmentation'].shape == (image_size, image_size)
  assert example['segmentation'].dtype == np.int32


def test_length_and_out_of_range_index():
  source = synthetic.SyntheticShapes(5, seed=0)
  assert len(source) == 5
  with pytest.raises(IndexError):
    source[5]


def test_boxes_are_in_unit_range_with_padding_rows_after_objects(examples):
  for example in examples:
    boxes = example['boxes']
    valid = boxes[:, 0] >= 0
    count = int(valid.sum())
    assert 1 <= count <= synthetic.MAX_OBJECTS
    assert valid[:count].all(), 'objects come first, padding after'
    np.testing.assert_array_equal(boxes[count:], synthetic.BOX_PADDING)
    coords = boxes[:count, 1:]
    assert (coords >= 0).all() and (coords <= 1).all()
    assert (coords[:, 2] > coords[:, 0]).all()
    assert (coords[:, 3] > coords[:, 1]).all()
    assert set(boxes[:count, 0]) <= set(range(synthetic.NUM_CLASSES))


def test_label_is_class_of_first_object(examples):
  for example in examples:
    assert example['label'] == example['boxes'][0, 0]


def test_objects_are_reasonably_large(examples):
  for example in examples:
    boxes = valid_boxes(example)
    widths, heights = boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]
    sides = np.maximum(widths, heights) * 64
    assert (sides >= 10).all() and (sides <= 32).all(), sides


def test_caption_names_objects_in_box_order_with_distinct_colours(examples):
  for example in examples:
    objects, _ = parse_caption(example['caption'])
    boxes = valid_boxes(example)
    assert len(objects) == len(boxes)
    assert [synthetic.SHAPES.index(s) for _, s in objects] == list(boxes[:, 0])
    colours = [c for c, _ in objects]
    assert set(colours) <= set(synthetic.COLORS)
    assert len(set(colours)) == len(colours)


def test_caption_relations_match_box_centres(examples):
  checked = 0
  for example in examples:
    _, relations = parse_caption(example['caption'])
    boxes = valid_boxes(example)
    for (a, b), relation in relations.items():
      assert relation == expected_relation(boxes[a], boxes[b]), (
          example['caption'])
      checked += 1
  assert checked > NUM_CHECKED // 2


def test_single_object_caption_has_no_relation():
  source = synthetic.SyntheticShapes(200, seed=0)
  single = next(source[i] for i in range(200)
                if len(valid_boxes(source[i])) == 1)
  colour_shape = single['caption'].split(' ', 1)[1]
  assert single['caption'] in (f'a {colour_shape}', f'an {colour_shape}')
  assert colour_shape.split()[1] == synthetic.SHAPES[single['label']]


def test_segmentation_pixels_lie_inside_a_box_of_their_class(examples):
  size = 64
  centres = (np.arange(size) + 0.5) / size
  for example in examples:
    segmentation = example['segmentation']
    boxes = valid_boxes(example)
    covered = np.zeros_like(segmentation, bool)
    for kind, x0, y0, x1, y1 in boxes:
      inside = (((centres[None, :] > x0) & (centres[None, :] < x1))
                & ((centres[:, None] > y0) & (centres[:, None] < y1)))
      covered |= inside & (segmentation == int(kind) + 1)
      assert (segmentation[inside] == int(kind) + 1).any(), 'object is visible'
    assert np.array_equal(covered, segmentation > 0)
    assert segmentation.min() == 0
    assert segmentation.max() <= synthetic.NUM_CLASSES


def test_segmentation_marks_pixels_that_differ_from_background(examples):
  for example in examples:
    image = example['image'].astype(int)
    foreground = example['segmentation'] > 0
    # Shapes are painted in palette colours, the background is pale.
    palette = np.array(list(synthetic.COLORS.values()))
    in_palette = (np.abs(image[..., None, :] - palette).max(-1) == 0).any(-1)
    np.testing.assert_array_equal(in_palette[foreground], True)
    assert foreground.mean() < 0.6


def test_set_covers_every_shape_colour_and_object_count():
  source = synthetic.SyntheticShapes(300, seed=0)
  kinds, colours, counts = set(), set(), set()
  for i in range(300):
    example = source[i]
    objects, _ = parse_caption(example['caption'])
    kinds.update(valid_boxes(example)[:, 0].astype(int))
    colours.update(c for c, _ in objects)
    counts.add(len(objects))
  assert kinds == set(range(synthetic.NUM_CLASSES))
  assert colours == set(synthetic.COLORS)
  assert counts == {1, 2, 3}


def test_backgrounds_are_smooth():
  source = synthetic.SyntheticShapes(30, seed=0)
  for i in range(30):
    example = source[i]
    image = example['image'].astype(np.float32)
    background = example['segmentation'] == 0
    step = np.abs(np.diff(image, axis=1)).max(-1)
    both_background = background[:, 1:] & background[:, :-1]
    assert step[both_background].max() <= 8  # A gentle gradient at most.

