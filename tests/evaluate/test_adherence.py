"""Tests for evaluate/adherence.py on the synthetic set's own maps: shape_map = the segmentation,
colour_map = synthetic.color_map. These stand in for the parser's output: training a parser to the
accuracy these bounds need takes minutes (shapes_parser.py's CLI), too long for a unit test.

Every measure is shown to succeed on images with their own conditions and to fail on the same images
with conditions shifted to the next image.
"""

import numpy as np
import pytest

from latent_diffusion.data import pipeline, synthetic
from latent_diffusion.evaluate import adherence

NUM_IMAGES = 64


@pytest.fixture(scope='module')
def examples():
  records = [synthetic.make_example(3, index) for index in range(NUM_IMAGES)]
  return {
      'shape_map': np.stack([r['segmentation'] for r in records]),
      'colour_map': np.stack([synthetic.color_map(r) for r in records]),
      'caption': [r['caption'] for r in records],
      'boxes': np.stack([r['boxes'] for r in records]),
      'label': np.stack([r['label'] for r in records]),
      'num_objects': np.array([int(np.sum(r['boxes'][:, 0] >= 0)) for r in records]),
  }


def shifted(values):
  """Each image gets the next image's condition."""
  return values[1:] + values[:1] if isinstance(values, list) else np.roll(values, -1, axis=0)


def test_color_map_marks_each_shape_pixel_with_its_objects_colour(examples):
  for n in range(8):
    colours = set(np.unique(examples['colour_map'][n])) - {0}
    named = {synthetic.COLOR_NAMES.index(c) + 1 for c, _ in
             (name.split() for name in _object_names(examples['caption'][n]))}
    assert colours == named
    np.testing.assert_array_equal(examples['colour_map'][n] > 0, examples['shape_map'][n] > 0)


def _object_names(caption):
  """'colour shape' of each object of a caption, read with plain string handling."""
  words = caption.replace(' the ', ' THE ').split()
  return [f'{words[i + 1]} {words[i + 2]}' for i, word in enumerate(words) if word in ('a', 'an')]


def test_color_map_refuses_a_changed_image():
  record = synthetic.make_example(3, 0)
  record['image'] = pipeline.resize_image(pipeline.resize_image(record['image'], 48), 64)
  with pytest.raises(ValueError, match='not in COLORS'):
    synthetic.color_map(record)


def test_detected_objects_of_single_object_images_are_the_drawn_object(examples):
  single = np.flatnonzero(examples['num_objects'] == 1)
  assert len(single) >= 5
  detected = adherence.detect_objects(examples['shape_map'][single], examples['colour_map'][single])
  for n, objects in zip(single, detected):
    assert len(objects) == 1
    (obj,) = objects
    assert synthetic.caption([f'{synthetic.COLOR_NAMES[obj.colour]} {synthetic.SHAPES[obj.shape]}'],
                             [obj.box]) == examples['caption'][n]
    np.testing.assert_allclose(obj.box, examples['boxes'][n, 0, 1:], atol=1e-6)
    np.testing.assert_array_equal(obj.mask, examples['shape_map'][n] > 0)


def test_tiny_components_are_ignored_and_larger_ones_kept():
  shape_map = np.zeros((1, 64, 64), np.int32)
  colour_map = np.zeros((1, 64, 64), np.int32)
  shape_map[0, 2:5, 2:5], colour_map[0, 2:5, 2:5] = 1, 1  # 9 pixels
  shape_map[0, 30:36, 30:36], colour_map[0, 30:36, 30:36] = 2, 3  # 36 pixels
  (objects,) = adherence.detect_objects(shape_map, colour_map)
  assert [(o.colour, o.shape) for o in objects] == [(2, 1)]
  np.testing.assert_allclose(objects[0].box, [30 / 64, 30 / 64, 36 / 64, 36 / 64])
  (objects,) = adherence.detect_objects(shape_map, colour_map, min_pixels=9)
  assert [(o.colour, o.shape) for o in objects] == [(0, 0), (2, 1)]


def test_an_objects_shape_is_the_majority_of_its_pixels():
  shape_map = np.zeros((1, 32, 32), np.int32)
  colour_map = np.zeros((1, 32, 32), np.int32)
  colour_map[0, 4:14, 4:14] = 5
  shape_map[0, 4:14, 4:14] = 3
  shape_map[0, 4:7, 4:14] = 6  # 30 of 100 pixels vote for another shape
  (objects,) = adherence.detect_objects(shape_map, colour_map)
  assert [(o.colour, o.shape) for o in objects] == [(4, 2)]


def test_caption_objects_reads_back_what_synthetic_caption_wrote():
  rng = np.random.default_rng(0)
  for _ in range(50):
    count = int(rng.integers(1, 4))
    colours = rng.choice(len(synthetic.COLOR_NAMES), count, replace=False)
    shapes = rng.integers(0, synthetic.NUM_CLASSES, count)
    boxes = [np.sort(rng.uniform(0, 1, 2)).tolist() for _ in range(2 * count)]
    boxes = [[x[0], y[0], x[1], y[1]] for x, y in zip(boxes[::2], boxes[1::2])]
    names = [f'{synthetic.COLOR_NAMES[c]} {synthetic.SHAPES[s]}' for c, s in zip(colours, shapes)]
    parsed = adherence.caption_objects(synthetic.caption(names, boxes))
    assert parsed.objects == tuple(zip(colours.tolist(), shapes.tolist()))
    expected = [(0, synthetic.relation(boxes[0], boxes[1]), 1)] if count >= 2 else []
    if count == 3:
      expected.append((2, synthetic.relation(boxes[2], boxes[0]), 0))
    assert parsed.relations == tuple(expected)


@pytest.mark.parametrize('caption, message', [
    ('a red hexagon', "unknown word 'hexagon'"),
    ('a Red circle', "unknown word 'Red'"),
    ('a red circle left a blue square', "expected 'of' at word 5"),
    ('a red circle left of', "expected 'a' or 'an' at word 6, found the end"),
    ('a red circle and a blue square below the green ring', 'names no earlier object'),
    ('red circle', "expected 'a' or 'an' at word 1"),
])
def test_caption_objects_names_the_word_that_breaks_the_grammar(caption, message):
  with pytest.raises(ValueError, match=message):
    adherence.caption_objects(caption)


def test_text_adherence_is_high_for_own_captions_and_low_for_shifted_ones(examples):
  own = adherence.text_adherence(examples['shape_map'], examples['colour_map'], examples['caption'])
  assert own['objects'] >= 0.9 and own['objects_and_relations'] >= 0.9
  assert own['object_recall'] >= 0.9 and own['colour_recall'] >= own['object_recall']
  other = adherence.text_adherence(examples['shape_map'], examples['colour_map'],
                                   shifted(examples['caption']))
  assert other['objects'] <= 0.2 and other['objects_and_relations'] <= other['objects']
  assert other['object_recall'] <= 0.3 and other['colour_recall'] <= 0.5


def test_text_adherence_checks_relations_beyond_the_objects(examples):
  # Mirrored images keep their objects; captions with 'left of' / 'right of' become false until the
  # caption is mirrored too.
  horizontal = [n for n, c in enumerate(examples['caption']) if ' left of ' in c or ' right of ' in c]
  assert len(horizontal) >= 10
  shape_maps = examples['shape_map'][horizontal, :, ::-1]
  colour_maps = examples['colour_map'][horizontal, :, ::-1]
  captions = [examples['caption'][n] for n in horizontal]
  objects_match, relations_match = adherence.text_matches(shape_maps, colour_maps, captions)
  assert objects_match.mean() >= 0.9 and relations_match.mean() <= 0.1
  mirrored = [pipeline.flip_caption(c) for c in captions]
  objects_match, relations_match = adherence.text_matches(shape_maps, colour_maps, mirrored)
  assert objects_match.mean() >= 0.9 and relations_match.mean() >= 0.9


def test_text_adherence_counts_a_missing_or_extra_object_as_a_failure(examples):
  two = [n for n in range(NUM_IMAGES) if examples['num_objects'][n] >= 2][:10]
  colour_maps = examples['colour_map'][two].copy()
  shape_maps = examples['shape_map'][two].copy()
  for m, n in enumerate(two):  # erase the largest object's visible pixels
    erased = colour_maps[m] == adherence.caption_objects(examples['caption'][n]).objects[0][0] + 1
    colour_maps[m][erased], shape_maps[m][erased] = 0, 0
  captions = [examples['caption'][n] for n in two]
  measures = adherence.text_adherence(shape_maps, colour_maps, captions)
  assert measures['objects'] == 0.0
  # The recalls grade it: at least one prompted object of each image is gone, the others are found.
  prompted = sum(len(adherence.caption_objects(c).objects) for c in captions)
  assert measures['object_recall'] * prompted <= prompted - len(two)
  assert measures['colour_recall'] * prompted <= prompted - len(two)
  assert measures['colour_recall'] >= measures['object_recall'] > 0.3


def test_layout_adherence_is_high_for_own_boxes_and_low_for_shifted_ones(examples):
  own = adherence.layout_adherence(examples['shape_map'], examples['colour_map'], examples['boxes'])
  assert own >= 0.8
  other = adherence.layout_adherence(examples['shape_map'], examples['colour_map'],
                                     shifted(examples['boxes']))
  assert other <= 0.3


def test_box_ious_are_nan_for_padding_rows_and_zero_without_an_object_of_the_class(examples):
  boxes = examples['boxes'].copy()
  ious = adherence.box_ious(examples['shape_map'], examples['colour_map'], boxes)
  np.testing.assert_array_equal(np.isnan(ious), boxes[..., 0] < 0)
  single = np.flatnonzero(examples['num_objects'] == 1)
  boxes[single, 0, 0] = (boxes[single, 0, 0] + 1) % synthetic.NUM_CLASSES  # ask for another shape
  ious = adherence.box_ious(examples['shape_map'], examples['colour_map'], boxes)
  np.testing.assert_array_equal(ious[single, 0], 0.0)


def test_box_iou_of_known_boxes():
  assert adherence.box_iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == pytest.approx(1.0)
  assert adherence.box_iou([0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5]) == pytest.approx(0.125 / 0.375)
  assert adherence.box_iou([0, 0, 0.2, 0.2], [0.5, 0.5, 1, 1]) == 0.0


def test_semantic_accuracy_is_high_for_own_segmentation_and_lower_for_shifted(examples):
  segmentation = examples['shape_map']
  assert adherence.semantic_accuracy(examples['shape_map'], segmentation) >= 0.95
  # Background is most of every image, so a wrong layout still matches most pixels.
  assert adherence.semantic_accuracy(examples['shape_map'], shifted(segmentation)) <= 0.85


def test_class_accuracy_counts_equal_labels(examples):
  labels = examples['label']
  assert adherence.class_accuracy(labels, labels) == 1.0
  other = shifted(labels)
  assert adherence.class_accuracy(labels, other) == pytest.approx(np.mean(labels == other))
  assert adherence.class_accuracy(labels, shifted(labels)) <= 0.4
  with pytest.raises(ValueError, match='labels must both be'):
    adherence.class_accuracy(labels, labels[:-1])
