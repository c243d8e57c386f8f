"""Tests for evaluate/shapes_parser.py: the network's layout operations, training targets, a short
training run that learns (the accuracy the adherence measures need takes minutes: the module's CLI,
measured there), parse, and the parameter file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.data import synthetic
from latent_diffusion.errors import CheckpointError
from latent_diffusion.evaluate import shapes_parser


TEST_SIZE = 32  # the short runs here train and parse at 32 px: a quarter of the work of 64 px


@pytest.fixture(scope='module')
def trained():
  return shapes_parser.train_parser(steps=30, batch_size=8, seed=5, image_size=TEST_SIZE)


def test_space_to_depth_and_back_is_the_identity_and_groups_2x2_blocks():
  x = jnp.arange(2 * 8 * 6 * 3, dtype=jnp.float32).reshape(2, 8, 6, 3)
  cells = shapes_parser.space_to_depth(x)
  assert cells.shape == (2, 4, 3, 12)
  np.testing.assert_array_equal(cells[1, 2, 1], np.asarray(x[1, 4:6, 2:4]).reshape(-1))
  np.testing.assert_array_equal(shapes_parser.depth_to_space(cells), x)


def test_upsample_nearest_repeats_each_cell():
  x = jnp.arange(2 * 3 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 3, 2)
  np.testing.assert_array_equal(shapes_parser.upsample_nearest(x), jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))


def test_make_batch_holds_the_examples_and_their_maps():
  batch = shapes_parser.make_batch(seed=2, start=10, count=3)
  for n, index in enumerate(range(10, 13)):
    record = synthetic.make_example(2, index)
    np.testing.assert_allclose((batch['image'][n] + 1.0) * 127.5, record['image'], atol=1e-3)
    np.testing.assert_array_equal(batch['shape_map'][n], record['segmentation'])
    np.testing.assert_array_equal(batch['colour_map'][n], synthetic.color_map(record))
  assert batch['image'].dtype == np.float32 and batch['shape_map'].shape == (3, 64, 64)


def test_perturb_is_mild_random_and_keyed():
  images = jnp.asarray(shapes_parser.make_batch(seed=2, start=0, count=8)['image'])
  perturb = jax.jit(shapes_parser.perturb)
  a = perturb(images, jax.random.key(0))
  np.testing.assert_array_equal(a, perturb(images, jax.random.key(0)))
  assert not np.allclose(a, perturb(images, jax.random.key(1)))
  assert 0.0 < float(jnp.mean(jnp.abs(a - images))) < 0.1


def test_network_maps_every_pixel_to_shape_and_colour_logits():
  params = shapes_parser.abstract_params()
  assert 1e5 < sum(p.size for p in jax.tree.leaves(params)) < 5e5
  shape_logits, colour_logits = jax.eval_shape(
      lambda p, x: shapes_parser.ShapesParser().apply({'params': p}, x), params,
      jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.float32))
  assert shape_logits.shape == (2, 32, 48, shapes_parser.NUM_SHAPE_CLASSES)
  assert colour_logits.shape == (2, 32, 48, shapes_parser.NUM_COLOUR_CLASSES)


def test_a_short_training_run_lowers_the_loss_and_finds_the_background(trained):
  # 30 steps of 8 images: the loss falls well below its start and much of the background (most
  # pixels) is found; the >97% accuracies of shapes and colours take minutes (the CLI).
  params, metrics = trained
  initial = shapes_parser.init_params(5, TEST_SIZE)
  batch = shapes_parser.make_batch(5, 0, 8, TEST_SIZE)
  loss = jax.jit(shapes_parser._loss)  # pylint: disable=protected-access
  initial_loss = float(loss(initial, batch['image'], batch['shape_map'], batch['colour_map']))
  assert metrics['loss'] < 0.6 * initial_loss
  held_out = shapes_parser.make_batch(shapes_parser.VALIDATION_SEED, 0, shapes_parser.VALIDATION_SIZE,
                                      TEST_SIZE)
  untrained = shapes_parser.pixel_accuracies(initial, held_out)
  assert metrics['shape_accuracy'] > untrained['shape_accuracy'] + 0.3
  assert metrics['colour_accuracy'] > untrained['colour_accuracy'] + 0.3
  assert metrics['steps'] == 30 and metrics['train_seconds'] > 0
  assert set(metrics) >= {'shape_accuracy_foreground', 'colour_accuracy_foreground'}


def test_training_refuses_the_validation_seed():
  with pytest.raises(ValueError, match='validation examples'):
    shapes_parser.train_parser(steps=1, batch_size=1, seed=shapes_parser.VALIDATION_SEED)


def test_parse_gives_int_maps_the_same_in_chunks(trained, monkeypatch):
  params, _ = trained
  images = shapes_parser.make_batch(seed=9, start=0, count=5, image_size=TEST_SIZE)['image']
  shape_map, colour_map = shapes_parser.parse(params, images)
  assert shape_map.shape == colour_map.shape == (5, TEST_SIZE, TEST_SIZE)
  assert shape_map.dtype == colour_map.dtype == np.int32
  assert shape_map.max() < shapes_parser.NUM_SHAPE_CLASSES
  assert colour_map.max() < shapes_parser.NUM_COLOUR_CLASSES
  logits = jax.jit(shapes_parser.ShapesParser().apply)({'params': params}, images)
  np.testing.assert_array_equal(shape_map, np.argmax(logits[0], -1))
  np.testing.assert_array_equal(colour_map, np.argmax(logits[1], -1))
  monkeypatch.setattr(shapes_parser, '_PARSE_CHUNK', 2)  # chunks of 2, 2 and 1 padded to 2
  chunked = shapes_parser.parse(params, images)
  np.testing.assert_array_equal(chunked[0], shape_map)
  np.testing.assert_array_equal(chunked[1], colour_map)


def test_parse_refuses_sides_the_network_cannot_halve_four_times():
  with pytest.raises(ValueError, match='multiples of 16'):
    shapes_parser.parse(shapes_parser.abstract_params(), np.zeros((1, 40, 40, 3), np.float32))


def test_save_and_load_round_trip(trained, tmp_path):
  params, _ = trained
  path = shapes_parser.save_parser(tmp_path / 'a' / 'parser.msgpack', params)
  loaded = shapes_parser.load_parser(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_load_parser_names_a_missing_or_wrong_file(tmp_path):
  with pytest.raises(CheckpointError, match='no file at .*missing.msgpack'):
    shapes_parser.load_parser(tmp_path / 'missing.msgpack')
  (tmp_path / 'text.msgpack').write_text('hello')
  with pytest.raises(CheckpointError, match='text.msgpack'):
    shapes_parser.load_parser(tmp_path / 'text.msgpack')
  narrow = jax.eval_shape(shapes_parser.ShapesParser(widths=(8, 16, 24, 32)).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  narrow = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), narrow)
  shapes_parser.save_parser(tmp_path / 'narrow.msgpack', narrow)
  with pytest.raises(CheckpointError, match='narrow.msgpack: parameter .* has shape'):
    shapes_parser.load_parser(tmp_path / 'narrow.msgpack')
