"""Tests for the precomputed-latents cache: writing, reuse, iteration, state."""

import json

import numpy as np
from PIL import Image
import pytest

from latent_diffusion import errors
from latent_diffusion.data import latents
from latent_diffusion.data import pipeline

SIZE = 12
BATCH = 5  # Does not divide SIZE: the last encode batch is padded.
FINGERPRINT = {'autoencoder_step': 7}


class Encoder:
  """Cheap deterministic encode_fn: 4x4 mean pool + constant logvar; counts calls."""

  def __init__(self, batch_size=BATCH):
    self.batch_size = batch_size
    self.calls = 0

  def __call__(self, images):
    assert images.shape[0] == self.batch_size and images.dtype == np.float32
    self.calls += 1
    return encode(images)


def encode(images):
  b, s, _, c = images.shape
  mean = images.reshape(b, s // 4, 4, s // 4, 4, c).mean(axis=(2, 4))
  return np.concatenate([mean, np.full_like(mean, -2.0)], axis=-1)


@pytest.fixture
def config(make_data_config):
  return make_data_config(synthetic_size=SIZE, image_size=16, flip=True)


def write(directory, config, encoder=None, fingerprint=FINGERPRINT, **kwargs):
  encoder = Encoder() if encoder is None else encoder
  return latents.write_cache(directory, config, encoder, batch_size=BATCH,
                             fingerprint=fingerprint, process_index=0,
                             process_count=1, **kwargs)


def pipeline_images(config, count=SIZE):
  """Every image the pipeline gives in source order, unshuffled, unflipped."""
  config = config.copy_and_resolve_references()
  config.flip = False
  iterator = pipeline.make_iterator(config, batch_size=count, seed=0,
                                    shuffle=False, num_epochs=1,
                                    process_index=0, process_count=1)
  return next(iterator)['image']


def iterate(directory, count, **kwargs):
  kwargs = {'batch_size': 4, 'seed': 0, 'flip': True, 'process_index': 0,
            'process_count': 1, **kwargs}
  iterator = latents.make_iterator(directory, **kwargs)
  return [next(iterator)['moments'] for _ in range(count)]


def find_rows(batches, cached):
  """(index, variant) in the cache of every row of the batches."""
  flat = cached.reshape(cached.shape[0] * cached.shape[1], -1)
  found = []
  for row in np.concatenate(batches):
    match = np.flatnonzero((flat == row.reshape(1, -1)).all(axis=1))
    assert len(match) == 1
    found.append(divmod(int(match[0]), cached.shape[1]))
  return found


def test_cached_moments_are_the_encoded_pipeline_images_and_mirrors(
    config, tmp_path):
  path = write(tmp_path, config)
  cached = np.load(path)
  images = pipeline_images(config)
  assert cached.dtype == np.float32 and cached.shape == (SIZE, 2, 4, 4, 6)
  np.testing.assert_array_equal(cached[:, 0], encode(images))
  np.testing.assert_array_equal(cached[:, 1], encode(images[:, :, ::-1]))


def test_without_flip_the_cache_holds_only_the_unflipped_moments(
    make_data_config, tmp_path):
  config = make_data_config(synthetic_size=SIZE, image_size=16, flip=False)
  cached = np.load(write(tmp_path, config))
  assert cached.shape == (SIZE, 1, 4, 4, 6)
  np.testing.assert_array_equal(cached[:, 0], encode(pipeline_images(config)))


def test_random_crop_config_is_cached_as_centre_crops(make_data_config,
                                                     tmp_path):
  rng = np.random.default_rng(0)
  for i in range(4):  # Wide images: a random crop would move the window.
    pixels = rng.integers(0, 256, (16, 28, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / f'{i}.png')
  config = make_data_config(source='folder', path=str(tmp_path), crop='random',
                            image_size=16, flip=False, label_column='')
  cached = np.load(write(tmp_path / 'cache', config))
  config.crop = 'center'
  np.testing.assert_array_equal(cached[:, 0],
                                encode(pipeline_images(config, count=4)))


def test_meta_file_records_fingerprint_counts_and_shape(config, tmp_path):
  write(tmp_path, config)
  meta = json.loads((tmp_path / 'moments-00000-of-00001.json').read_text())
  assert meta['fingerprint'] == FINGERPRINT
  assert meta['count'] == SIZE and meta['variants'] == 2
  assert meta['shape'] == [SIZE, 2, 4, 4, 6]
  assert meta['data']['synthetic_size'] == SIZE
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'moments-00000-of-00001.json', 'moments-00000-of-00001.npy']


def test_rerun_with_the_same_fingerprint_does_not_encode(config, tmp_path):
  write(tmp_path, config)
  encoder = Encoder()
  write(tmp_path, config, encoder)
  assert encoder.calls == 0


def test_changed_fingerprint_rebuilds_the_cache(config, tmp_path):
  path = write(tmp_path, config)
  before = np.load(path)
  encoder = Encoder()
  write(tmp_path, config, encoder, fingerprint={'autoencoder_step': 8})
  assert encoder.calls == 2 * 3  # 3 batches, each unflipped and mirrored.
  np.testing.assert_array_equal(np.load(path), before)
  assert latents.read_meta(path.with_suffix('.json'))['fingerprint'] == {
      'autoencoder_step': 8}


def test_changed_data_config_rebuilds_the_cache(config, tmp_path):
  path = write(tmp_path, config)
  config.synthetic_seed = 1
  encoder = Encoder()
  write(tmp_path, config, encoder)
  assert encoder.calls > 0
  np.testing.assert_array_equal(np.load(path)[:, 0],
                                encode(pipeline_images(config)))


def test_file_without_meta_is_rebuilt(config, tmp_path):
  path = write(tmp_path, config)
  path.with_suffix('.json').unlink()  # As if killed before the meta file.
  encoder = Encoder()
  write(tmp_path, config, encoder)
  assert encoder.calls > 0


def test_two_processes_cover_the_data_set_disjointly(config, tmp_path):
  whole = np.load(write(tmp_path / 'one', config))
  parts = [np.load(latents.write_cache(
      tmp_path / 'two', config, Encoder(), batch_size=BATCH,
      fingerprint=FINGERPRINT, process_index=i, process_count=2))
           for i in range(2)]
  assert [p.shape[0] for p in parts] == [SIZE // 2, SIZE // 2]
  np.testing.assert_array_equal(parts[0], whole[0::2])
  np.testing.assert_array_equal(parts[1], whole[1::2])


def test_iterator_yields_float32_moment_batches(config, tmp_path):
  write(tmp_path, config)
  batch = latents.make_iterator(tmp_path, batch_size=4, seed=0, flip=True,
                                process_index=0, process_count=1)
  batch = next(batch)
  assert list(batch) == ['moments']
  assert batch['moments'].dtype == np.float32
  assert batch['moments'].shape == (4, 4, 4, 6)


def test_iterator_is_deterministic_by_seed(config, tmp_path):
  write(tmp_path, config)
  first, again = iterate(tmp_path, 6, seed=3), iterate(tmp_path, 6, seed=3)
  other = iterate(tmp_path, 6, seed=4)
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))


def test_each_epoch_visits_every_example_in_a_new_order(config, tmp_path):
  cached = np.load(write(tmp_path, config))
  rows = find_rows(iterate(tmp_path, 6, flip=False), cached)  # 2 epochs.
  indices = [index for index, _ in rows]
  assert sorted(indices[:SIZE]) == sorted(indices[SIZE:]) == list(range(SIZE))
  assert indices[:SIZE] != indices[SIZE:]
  assert {variant for _, variant in rows} == {0}


def test_unshuffled_iterator_follows_source_order(config, tmp_path):
  cached = np.load(write(tmp_path, config))
  rows = find_rows(iterate(tmp_path, 3, flip=False, shuffle=False), cached)
  assert rows == [(i, 0) for i in range(SIZE)]


def test_flip_yields_both_the_image_and_its_mirror(config, tmp_path):
  cached = np.load(write(tmp_path, config))
  variants = [v for _, v in find_rows(iterate(tmp_path, 12), cached)]
  assert 0.25 < np.mean(variants) < 0.75


def test_restored_state_continues_the_stream_exactly(config, tmp_path):
  write(tmp_path, config)
  make = lambda: latents.make_iterator(tmp_path, batch_size=5, seed=1,
                                       flip=True, process_index=0,
                                       process_count=1)
  iterator = make()
  for _ in range(2):
    next(iterator)
  state = iterator.get_state()  # 10 of 12 seen: the next batches span epochs.
  expected = [next(iterator)['moments'] for _ in range(4)]
  restored = make()
  restored.set_state(json.loads(json.dumps(state)))  # As orbax stores it.
  np.testing.assert_array_equal(
      np.stack([next(restored)['moments'] for _ in range(4)]),
      np.stack(expected))


def test_missing_cache_raises_data_error_naming_the_path(tmp_path):
  with pytest.raises(errors.DataError,
                     match=str(tmp_path / 'moments-00000-of-00001.json')):
    latents.make_iterator(tmp_path, batch_size=4, seed=0, flip=False,
                          process_index=0, process_count=1)


def test_corrupt_cache_raises_data_error_naming_the_path(config, tmp_path):
  path = write(tmp_path, config)
  path.write_bytes(path.read_bytes()[:200])  # Truncated data.
  with pytest.raises(errors.DataError, match=str(path)):
    latents.make_iterator(tmp_path, batch_size=4, seed=0, flip=False,
                          process_index=0, process_count=1)


def test_flip_from_a_cache_without_mirrors_raises_data_error(
    make_data_config, tmp_path):
  write(tmp_path, make_data_config(synthetic_size=SIZE, image_size=16,
                                   flip=False))
  with pytest.raises(errors.DataError, match='flip'):
    latents.make_iterator(tmp_path, batch_size=4, seed=0, flip=True,
                          process_index=0, process_count=1)


def test_cache_of_another_process_count_is_not_read(config, tmp_path):
  write(tmp_path, config)
  with pytest.raises(errors.DataError, match='of-00002'):
    latents.make_iterator(tmp_path, batch_size=4, seed=0, flip=True,
                          process_index=0, process_count=2)


def test_cache_with_labels_keeps_each_examples_label_beside_its_moments(config, tmp_path):
  path = write(tmp_path, config, with_labels=True)
  config_unflipped = config.copy_and_resolve_references()
  config_unflipped.flip = False
  source_labels = next(pipeline.make_iterator(
      config_unflipped, batch_size=SIZE, seed=0, shuffle=False, num_epochs=1,
      process_index=0, process_count=1))['label']
  np.testing.assert_array_equal(np.load(latents.labels_path(path)), source_labels)
  cached = np.load(path)
  iterator = latents.make_iterator(tmp_path, batch_size=4, seed=0, flip=True,
                                   process_index=0, process_count=1)
  for _ in range(3):
    batch = next(iterator)
    rows = find_rows([batch['moments']], cached)
    np.testing.assert_array_equal(batch['label'], source_labels[[i for i, _ in rows]])


def test_a_cache_without_labels_is_rebuilt_when_labels_are_asked_for(config, tmp_path):
  write(tmp_path, config)
  encoder = Encoder()
  path = write(tmp_path, config, encoder=encoder, with_labels=True)
  assert encoder.calls > 0
  assert latents.labels_path(path).exists()
