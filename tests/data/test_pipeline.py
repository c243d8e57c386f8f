"""Tests for the grain pipeline: sources, transforms, batches, shards, state."""

import json
import re

import numpy as np
from PIL import Image
import pytest

from latent_diffusion import errors
from latent_diffusion.data import degradation
from latent_diffusion.data import folder
from latent_diffusion.data import pipeline
from latent_diffusion.data import synthetic


class IndexSource:
  """n tiny records whose label is their index, to track order and coverage."""

  def __init__(self, n, height=4, width=4):
    self.n, self.height, self.width = n, height, width

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    image = np.full((self.height, self.width, 3), index % 256, np.uint8)
    return {'image': image, 'label': np.int32(index)}


RELATION_RE = re.compile(r'an? \w+ \w+ (left of|right of|above|below)')


def labels_of(batches):
  return np.concatenate([b['label'] for b in batches]).tolist()


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def box_relation(box_a, box_b):
  ax, ay = (box_a[1] + box_a[3]) / 2, (box_a[2] + box_a[4]) / 2
  bx, by = (box_b[1] + box_b[3]) / 2, (box_b[2] + box_b[4]) / 2
  if abs(ax - bx) >= abs(ay - by):
    return 'left of' if ax < bx else 'right of'
  return 'above' if ay < by else 'below'


# Sources and config checks.


def test_make_source_builds_synthetic_source_from_config(make_data_config):
  source = pipeline.make_source(make_data_config(synthetic_size=12,
                                                 synthetic_seed=5,
                                                 image_size=32))
  assert isinstance(source, synthetic.SyntheticShapes)
  assert (len(source), source.seed, source.image_size) == (12, 5, 32)


def test_make_source_builds_folder_source_from_config(make_data_config,
                                                      shared_data):
  cifar = shared_data / 'cifar10' / 'test'
  source = pipeline.make_source(make_data_config(source='folder',
                                                 path=str(cifar)))
  assert isinstance(source, folder.ImageFolder) and len(source) == 2000


def test_unknown_source_raises_config_error_naming_field(make_data_config):
  with pytest.raises(errors.ConfigError, match=r"data\.source.*'imagenet'"):
    pipeline.make_source(make_data_config(source='imagenet'))


@pytest.mark.parametrize('field, value', [
    ('crop', 'top'), ('image_size', 0), ('worker_count', -1),
    ('synthetic_size', 0), ('max_bad_fraction', 1.5),
    ('max_bad_fraction', -0.1)])
def test_bad_field_raises_config_error_naming_it(make_data_config, field,
                                                 value):
  with pytest.raises(errors.ConfigError, match=rf'data\.{field}'):
    pipeline.make_source(make_data_config(**{field: value}))


def test_folder_source_without_path_raises_config_error(make_data_config):
  with pytest.raises(errors.ConfigError, match=r'data\.path'):
    pipeline.make_source(make_data_config(source='folder'))


def test_folder_source_with_missing_path_raises_data_error(make_data_config,
                                                           tmp_path):
  config = make_data_config(source='folder', path=str(tmp_path / 'gone'))
  with pytest.raises(errors.DataError, match='gone'):
    pipeline.make_dataset(config, batch_size=2, seed=0)


def test_describe_synthetic_names_size_classes_and_seed(make_data_config):
  assert pipeline.describe(make_data_config()) == (
      'synthetic shapes, 10000 examples, 6 classes, seed 0')


def test_describe_folder_names_path_count_and_labels(make_data_config,
                                                     shared_data):
  utk = shared_data / 'utkface64' / 'val'
  text = pipeline.describe(make_data_config(source='folder', path=str(utk)))
  assert text == (
      f"folder {utk}, 1000 images, labels from labels.csv column 'label'")
  cifar = shared_data / 'cifar10' / 'test'
  text = pipeline.describe(make_data_config(source='folder', path=str(cifar)))
  assert text.endswith('2000 images, labels from class folders (10 classes)')


# Batches.


def test_synthetic_batch_keys_shapes_and_dtypes(make_data_config):
  config = make_data_config(synthetic_size=64)
  batch = next(pipeline.make_iterator(config, batch_size=8, seed=0))
  assert batch['image'].shape == (8, 64, 64, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['boxes'].shape == (8, synthetic.MAX_OBJECTS, 5)
  assert batch['boxes'].dtype == np.float32
  assert batch['segmentation'].shape == (8, 64, 64)
  assert batch['segmentation'].dtype == np.int32
  assert batch['caption'].shape == (8,) and batch['caption'].dtype.kind == 'U'
  assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1


def test_unshuffled_unflipped_batch_is_the_source_scaled_to_unit_range(
    make_data_config):
  config = make_data_config(synthetic_size=16, flip=False)
  batch = next(pipeline.make_iterator(config, batch_size=4, seed=0,
                                      shuffle=False))
  source = synthetic.SyntheticShapes(16, seed=0)
  for i in range(4):
    expected = source[i]['image'].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(batch['image'][i], expected, atol=1e-6)
    assert batch['caption'][i] == source[i]['caption']
    np.testing.assert_array_equal(batch['segmentation'][i],
                                  source[i]['segmentation'])


def test_same_seed_gives_same_batches_and_another_seed_does_not(
    make_data_config):
  config = make_data_config(synthetic_size=40, image_size=16)

  def first_batches(seed):
    iterator = pipeline.make_iterator(config, batch_size=8, seed=seed)
    return [next(iterator) for _ in range(3)]

  first = first_batches(1)
  assert_same_batches(first_batches(1), first)
  other = first_batches(2)
  assert list(first[0]['caption']) != list(other[0]['caption'])


def test_flip_mirrors_image_segmentation_boxes_and_caption(make_data_config):
  config = make_data_config(synthetic_size=32)
  batch = next(pipeline.make_iterator(config, batch_size=32, seed=0,
                                      shuffle=False))
  source = synthetic.SyntheticShapes(32, seed=0)
  flipped = 0
  for i in range(32):
    original = source[i]
    image = (original['image'].astype(np.float32) / 127.5 - 1)
    if np.allclose(batch['image'][i], image, atol=1e-6):
      assert batch['caption'][i] == original['caption']
      continue
    flipped += 1
    np.testing.assert_allclose(batch['image'][i], image[:, ::-1], atol=1e-6)
    np.testing.assert_array_equal(batch['segmentation'][i],
                                  original['segmentation'][:, ::-1])
    boxes = batch['boxes'][i]
    valid = boxes[:, 0] >= 0
    np.testing.assert_allclose(boxes[valid, 1], 1 - original['boxes'][valid, 3])
    np.testing.assert_allclose(boxes[valid, 3], 1 - original['boxes'][valid, 1])
    caption = batch['caption'][i]
    swapped = original['caption'].replace('left', '<').replace(
        'right', 'left').replace('<', 'right')
    assert caption == swapped
    if valid.sum() >= 2:
      first_relation = RELATION_RE.match(caption).group(1)
      assert first_relation == box_relation(boxes[0], boxes[1])
  assert 5 <= flipped <= 27  # About half, with 32 coin flips.


def test_random_crop_of_wide_image_keeps_boxes_and_segmentation_aligned(
    make_data_config):
  # A 40x80 image: a square object at columns 50..59, rows 10..19.
  image = np.zeros((40, 80, 3), np.uint8)
  image[10:20, 50:60] = 255
  segmentation = np.zeros((40, 80), np.int32)
  segmentation[10:20, 50:60] = 2
  boxes = np.full((3, 5), -1, np.float32)
  boxes[0] = (1, 50 / 80, 10 / 40, 60 / 80, 20 / 40)
  record = {'image': image, 'segmentation': segmentation, 'boxes': boxes}
  crop = pipeline.CropResize(image_size=20, random_crop=True)
  seen_lefts = set()
  for seed in range(12):
    out = crop.random_map(record, np.random.default_rng(seed))
    assert out['image'].shape == (20, 20, 3)
    assert out['segmentation'].shape == (20, 20)
    box = out['boxes'][0]
    if box[0] < 0:  # Object cropped away entirely.
      assert (out['segmentation'] == 0).all()
      continue
    rows, cols = np.nonzero(out['segmentation'] == 2)
    np.testing.assert_allclose(
        [cols.min() / 20, rows.min() / 20, (cols.max() + 1) / 20,
         (rows.max() + 1) / 20], box[1:], atol=1 / 20)
    # Bicubic softens the object's edge pixels; its body stays white.
    object_pixels = out['image'][rows, cols]
    assert object_pixels.min() >= 100 and object_pixels.mean() > 200
    seen_lefts.add(round(float(box[1]), 3))
  assert len(seen_lefts) > 1, 'random crops should move the window'


def test_center_crop_takes_the_middle_square(make_data_config):
  image = np.zeros((10, 30, 3), np.uint8)
  image[:, 10:20] = 255  # The middle 10x10 square is white.
  crop = pipeline.CropResize(image_size=10, random_crop=False)
  out = crop.random_map({'image': image}, np.random.default_rng(0))
  assert (out['image'] == 255).all()


def test_cifar_folder_batches_are_resized_up_with_labels(make_data_config,
                                                         shared_data):
  config = make_data_config(source='folder',
                            path=str(shared_data / 'cifar10' / 'test'))
  batch = next(pipeline.make_iterator(config, batch_size=16, seed=0))
  assert batch['image'].shape == (16, 64, 64, 3)
  assert set(batch) == {'image', 'label'}
  assert ((0 <= batch['label']) & (batch['label'] < 10)).all()
  assert len(set(batch['label'].tolist())) > 1


def test_utkface_folder_pipeline_gives_csv_labels(make_data_config,
                                                  shared_data):
  config = make_data_config(source='folder', image_size=32, flip=False,
                            path=str(shared_data / 'utkface64' / 'val'))
  batch = next(pipeline.make_iterator(config, batch_size=4, seed=0,
                                      shuffle=False))
  source = folder.ImageFolder(shared_data / 'utkface64' / 'val')
  np.testing.assert_array_equal(batch['label'], source.labels[:4])
  assert batch['image'].shape == (4, 32, 32, 3)


def test_corrupt_file_in_folder_does_not_stop_the_pipeline(make_data_config,
                                                           tmp_path):
  for i in range(6):
    Image.new('RGB', (10, 12), (i * 40,) * 3).save(tmp_path / f'{i}.png')
  (tmp_path / '3.png').write_bytes(b'broken')
  config = make_data_config(source='folder', path=str(tmp_path), image_size=8,
                            max_bad_fraction=0.2)
  batches = [b for _, b in zip(range(6), pipeline.make_iterator(
      config, batch_size=4, seed=0))]
  assert all(b['image'].shape == (4, 8, 8, 3) for b in batches)


# Epochs, sharding and iterator state.


def test_one_epoch_visits_every_example_once_in_shuffled_order(
    make_data_config):
  config = make_data_config(image_size=4, flip=False)
  batches = list(pipeline.make_dataset(
      config, batch_size=8, seed=0, num_epochs=1, drop_remainder=False,
      source=IndexSource(30)))
  labels = labels_of(batches)
  assert sorted(labels) == list(range(30))
  assert labels != list(range(30))
  assert [len(b['label']) for b in batches] == [8, 8, 8, 6]


def test_drop_remainder_drops_the_short_last_batch(make_data_config):
  config = make_data_config(image_size=4)
  batches = list(pipeline.make_dataset(
      config, batch_size=8, seed=0, num_epochs=1, source=IndexSource(30)))
  assert [len(b['label']) for b in batches] == [8, 8, 8]


def test_each_epoch_is_shuffled_differently(make_data_config):
  config = make_data_config(image_size=4)
  labels = labels_of(pipeline.make_dataset(
      config, batch_size=10, seed=0, num_epochs=2, source=IndexSource(20)))
  first, second = labels[:20], labels[20:]
  assert sorted(first) == sorted(second) == list(range(20))
  assert first != second


def test_process_slices_are_disjoint_and_cover_the_set(make_data_config):
  config = make_data_config(image_size=4)
  per_process = []
  for process_index in range(3):
    per_process.append(set(labels_of(pipeline.make_dataset(
        config, batch_size=1, seed=0, num_epochs=1, process_index=process_index,
        process_count=3, source=IndexSource(31)))))
  assert set.union(*per_process) == set(range(31))
  assert sum(len(p) for p in per_process) == 31
  assert per_process[1] == set(range(1, 31, 3))


def test_process_defaults_come_from_jax(make_data_config):
  config = make_data_config(image_size=4)
  labels = labels_of(pipeline.make_dataset(
      config, batch_size=5, seed=0, num_epochs=1, source=IndexSource(10)))
  assert sorted(labels) == list(range(10))  # One process holds everything.


def test_too_few_examples_for_the_processes_raise_data_error(make_data_config):
  with pytest.raises(errors.DataError, match='4 processes'):
    pipeline.make_dataset(make_data_config(), batch_size=1, seed=0,
                          process_index=3, process_count=4,
                          source=IndexSource(3))


def test_state_round_trip_within_an_epoch_gives_identical_batches(
    make_data_config):
  config = make_data_config(synthetic_size=100, image_size=16)
  iterator = pipeline.make_iterator(config, batch_size=4, seed=3)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  restored = pipeline.make_iterator(config, batch_size=4, seed=3)
  restored.set_state(json.loads(json.dumps(state)))  # As orbax stores it.
  assert_same_batches([next(restored) for _ in range(4)], expected)


def test_state_round_trip_across_an_epoch_boundary_gives_identical_batches(
    make_data_config):
  config = make_data_config(image_size=4, crop='random', flip=True)
  make = lambda: pipeline.make_iterator(config, batch_size=4, seed=3,
                                        source=IndexSource(10, 4, 6))
  iterator = make()
  seen = labels_of([next(iterator)])
  state = iterator.get_state()  # 4 of the first epoch's 10 examples seen.
  expected = [next(iterator) for _ in range(4)]  # Runs into the 2nd epoch.
  restored = make()
  restored.set_state(state)
  assert_same_batches([next(restored) for _ in range(4)], expected)
  stream = seen + labels_of(expected)
  assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))


def test_orbax_checkpoint_of_the_iterator_restores_the_stream(
    make_data_config, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  import grain  # pylint: disable=g-import-not-at-top
  config = make_data_config(synthetic_size=20, image_size=16)
  iterator = pipeline.make_iterator(config, batch_size=4, seed=0)
  for _ in range(3):
    next(iterator)
  manager = ocp.CheckpointManager(
      tmp_path, options=ocp.CheckpointManagerOptions(
          enable_async_checkpointing=False))
  manager.save(3, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(3)]
  restored = pipeline.make_iterator(config, batch_size=4, seed=0)
  manager.restore(3, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches([next(restored) for _ in range(3)], expected)


def test_worker_processes_give_the_same_batches_as_in_process(
    make_data_config):
  config = make_data_config(synthetic_size=24, image_size=16)
  in_process = pipeline.make_iterator(config, batch_size=4, seed=0)
  expected = [next(in_process) for _ in range(3)]
  config = make_data_config(synthetic_size=24, image_size=16, worker_count=1)
  with_worker = pipeline.make_iterator(config, batch_size=4, seed=0)
  assert_same_batches([next(with_worker) for _ in range(3)], expected)
  state = with_worker.get_state()
  following = [next(with_worker) for _ in range(2)]
  restored = pipeline.make_iterator(config, batch_size=4, seed=0)
  restored.set_state(state)
  assert_same_batches([next(restored) for _ in range(2)], following)


# Super-resolution inputs and inpainting masks.


def conditioning_config(make_data_config, low_res_size=0,
                        degradation='bicubic', inpainting_masks=False,
                        **overrides):
  """A data config with base.py's super-resolution and inpainting fields."""
  config = make_data_config(**overrides)
  with config.unlocked():
    config.low_res_size = low_res_size
    config.degradation = degradation
    config.inpainting_masks = inpainting_masks
  return config


@pytest.mark.parametrize('kind', ['bicubic', 'bsrgan_light'])
def test_low_res_and_mask_batches_have_shapes_and_ranges(make_data_config,
                                                         kind):
  config = conditioning_config(make_data_config, low_res_size=8,
                               degradation=kind, inpainting_masks=True,
                               synthetic_size=16, image_size=32)
  batch = next(pipeline.make_iterator(config, batch_size=4, seed=0))
  assert batch['image'].shape == (4, 32, 32, 3)
  assert batch['low_res'].shape == (4, 8, 8, 3)
  assert batch['low_res'].dtype == np.float32
  assert -1 <= batch['low_res'].min() < 0 < batch['low_res'].max() <= 1
  assert batch['mask'].shape == (4, 32, 32, 1)
  assert batch['mask'].dtype == np.float32
  assert set(np.unique(batch['mask']).tolist()) == {0.0, 1.0}


def test_no_low_res_or_mask_when_disabled(make_data_config):
  config = conditioning_config(make_data_config, synthetic_size=8,
                               image_size=16)
  batch = next(pipeline.make_iterator(config, batch_size=4, seed=0))
  assert 'low_res' not in batch and 'mask' not in batch


def test_bicubic_low_res_is_the_downsampled_final_image(make_data_config):
  config = conditioning_config(make_data_config, low_res_size=8,
                               synthetic_size=8, image_size=32, crop='random')
  batch = next(pipeline.make_iterator(config, batch_size=8, seed=0))
  images = np.round((batch['image'] + 1) * 127.5).astype(np.uint8)
  for image, low_res in zip(images, batch['low_res']):
    expected = degradation.bicubic_downsample(image, 4)
    np.testing.assert_allclose(low_res, expected / 127.5 - 1, atol=1e-6)


def test_enabling_low_res_and_masks_leaves_the_images_unchanged(
    make_data_config):
  base = dict(synthetic_size=24, image_size=16, crop='random', flip=True)
  plain = pipeline.make_iterator(
      conditioning_config(make_data_config, **base), batch_size=4, seed=5)
  extended = pipeline.make_iterator(
      conditioning_config(make_data_config, low_res_size=4,
                          degradation='bsrgan_light', inpainting_masks=True,
                          **base), batch_size=4, seed=5)
  for _ in range(4):
    expected, batch = next(plain), next(extended)
    assert set(batch) == set(expected) | {'low_res', 'mask'}
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])


def test_derived_seeds_keep_their_values_when_more_are_asked_for():
  # pylint: disable=protected-access
  for seed, process_index in [(0, 0), (3, 1), (2**40, 7)]:
    fewer = pipeline._derived_seeds(seed, process_index, 3)
    more = pipeline._derived_seeds(seed, process_index, 5)
    assert more[:3] == fewer and len(set(more)) == 5


def test_low_res_and_masks_follow_the_seed_and_survive_a_restore(
    make_data_config):
  config = conditioning_config(make_data_config, low_res_size=8,
                               degradation='bsrgan_light',
                               inpainting_masks=True, synthetic_size=12,
                               image_size=32)
  make = lambda seed: pipeline.make_iterator(config, batch_size=4, seed=seed)
  iterator = make(1)
  first = [next(iterator) for _ in range(2)]
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]  # Into the 2nd epoch.
  again = make(1)
  assert_same_batches([next(again) for _ in range(5)], first + expected)
  restored = make(1)
  restored.set_state(json.loads(json.dumps(state)))
  assert_same_batches([next(restored) for _ in range(3)], expected)
  other = next(make(2))
  assert not np.array_equal(other['mask'], first[0]['mask'])
  # Every position of the stream, in either epoch, draws its own mask.
  masks_seen = np.concatenate([b['mask'] for b in first + expected])
  assert len({m.tobytes() for m in masks_seen}) == 20


@pytest.mark.parametrize('fields, message', [
    (dict(low_res_size=-1), r'data\.low_res_size.*>= 0.*-1'),
    (dict(low_res_size=12), r'data\.low_res_size.*divide.*\(64\).*12'),
    (dict(low_res_size=64), r'data\.low_res_size.*smaller.*64'),
    (dict(low_res_size=128), r'data\.low_res_size.*128'),
    (dict(low_res_size=16.0), r'data\.low_res_size.*integer.*16\.0'),
    (dict(degradation='lanczos'),
     r"data\.degradation.*'bicubic', 'bsrgan_light'.*'lanczos'"),
    (dict(inpainting_masks='yes'), r"data\.inpainting_masks.*'yes'"),
])
def test_bad_conditioning_field_raises_config_error_naming_it(
    make_data_config, fields, message):
  config = conditioning_config(make_data_config, **fields)
  with pytest.raises(errors.ConfigError, match=message):
    pipeline.check_config(config)


def test_valid_conditioning_fields_pass_the_check(make_data_config):
  pipeline.check_config(conditioning_config(
      make_data_config, low_res_size=16, degradation='bsrgan_light',
      inpainting_masks=True))
