"""Tests for the image-folder source."""

import csv
import logging
import pickle

import numpy as np
from PIL import Image
import pytest

from latent_diffusion import errors
from latent_diffusion.data import folder
from latent_diffusion.data import pipeline

CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                 'frog', 'horse', 'ship', 'truck')


def write_image(path, value=128, size=(8, 6), mode='RGB', fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  colour = value if mode == 'L' else (value, value, value)
  Image.new(mode, size, colour).save(path, format=fmt)
  return path


def write_csv(path, header, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_utkface_val_labels_come_from_labels_csv(shared_data):
  root = shared_data / 'utkface64' / 'val'
  with open(root / 'labels.csv', newline='') as f:
    expected = {row['filename']: int(row['label']) for row in csv.DictReader(f)}
  source = folder.ImageFolder(root)
  assert len(source) == len(expected) == 1000
  assert 'labels.csv' in source.label_source
  for index in (0, 1, 500, 999):
    record = source[index]
    assert record['label'] == expected[source.files[index]]
    assert record['label'].dtype == np.int32
    assert record['image'].shape == (64, 64, 3)
    assert record['image'].dtype == np.uint8
  assert set(source.labels.tolist()) == {0, 1, 2, 3, 4}


def test_utkface_other_csv_column_can_be_the_label(shared_data):
  source = folder.ImageFolder(shared_data / 'utkface64' / 'val',
                              label_column='age')
  ages = {int(name.split('_')[0]) for name in source.files}  # <age>_... names
  assert set(source.labels.tolist()) == ages


def test_cifar_test_labels_are_sorted_class_folder_indices(shared_data):
  source = folder.ImageFolder(shared_data / 'cifar10' / 'test')
  assert len(source) == 2000
  assert source.class_names == CIFAR_CLASSES
  assert source.label_source == 'class folders'
  np.testing.assert_array_equal(np.bincount(source.labels), [200] * 10)
  cat = next(i for i, f in enumerate(source.files) if f.startswith('cat/'))
  record = source[cat]
  assert record['label'] == CIFAR_CLASSES.index('cat')
  assert record['image'].shape == (32, 32, 3)


def test_files_are_found_recursively_any_case_and_sorted(tmp_path):
  write_image(tmp_path / 'b' / 'c' / 'y.JPEG', fmt='JPEG')
  write_image(tmp_path / 'a' / 'x.PNG', fmt='PNG')
  write_image(tmp_path / 'z.webp')
  write_image(tmp_path / 'm.bmp')
  write_image(tmp_path / 'g.Gif', fmt='GIF')
  write_image(tmp_path / '.hidden.png')
  write_image(tmp_path / '.cache' / 'h.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  source = folder.ImageFolder(tmp_path)
  assert source.files == ('a/x.PNG', 'b/c/y.JPEG', 'g.Gif', 'm.bmp', 'z.webp')
  # Images at the root: no class folders, no csv -> no labels.
  assert source.label_source is None
  assert 'label' not in source[0]


@pytest.mark.parametrize('mode, colour, fmt, expected', [
    ('L', 10, 'PNG', (10, 10, 10)),
    ('1', 1, 'PNG', (255, 255, 255)),
    ('P', 7, 'GIF', None),  # Palette entry 7 of the default palette.
    ('LA', (90, 0), 'PNG', (90, 90, 90)),
    ('RGBA', (10, 20, 30, 0), 'PNG', (10, 20, 30)),  # Alpha dropped.
    ('RGBA', (200, 100, 50, 128), 'WEBP', (200, 100, 50)),
    ('CMYK', (0, 255, 255, 0), 'JPEG', (255, 0, 0)),
])
def test_image_modes_decode_to_rgb_uint8_with_their_colour(
    tmp_path, mode, colour, fmt, expected):
  path = tmp_path / f'image.{fmt.lower()}'
  image = Image.new(mode, (5, 7), colour)
  image.save(path, format=fmt, **({'lossless': True} if fmt == 'WEBP' else {}))
  if expected is None:
    expected = image.convert('RGB').getpixel((0, 0))
  decoded = folder.ImageFolder(tmp_path)[0]['image']
  assert decoded.shape == (7, 5, 3) and decoded.dtype == np.uint8
  tolerance = 3 if fmt == 'JPEG' else 0
  np.testing.assert_allclose(decoded.reshape(-1, 3).astype(int),
                             np.broadcast_to(expected, (35, 3)),
                             atol=tolerance)


def test_sixteen_bit_grey_png_is_scaled_to_255_not_clipped(tmp_path):
  values = np.array([[0, 65535], [257 * 100, 1000]], np.uint16)
  Image.fromarray(values).save(tmp_path / 'deep.png')
  assert Image.open(tmp_path / 'deep.png').mode.startswith('I;16')
  image = folder.ImageFolder(tmp_path)[0]['image']
  assert image.shape == (2, 2, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[..., 0], [[0, 255], [100, 4]])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_thirty_two_bit_integer_image_is_read_as_sixteen_bit():
  values = np.array([[0, 65535, 1000], [-5, 70000, 257 * 100]], np.int32)
  rgb = folder.to_rgb(Image.fromarray(values))
  np.testing.assert_array_equal(rgb[..., 1], [[0, 255, 4], [0, 255, 100]])


@pytest.mark.parametrize('peak, expected', [
    (1.0, [[0, 128], [255, 64]]),  # [0, 1]
    (255.0, [[0, 128], [255, 64]]),  # [0, 255]
    (65535.0, [[0, 128], [255, 64]]),  # [0, 65535]
])
def test_float_image_is_scaled_from_the_range_holding_its_maximum(
    peak, expected):
  values = np.array([[0, 0.5], [1, 0.25]], np.float32) * np.float32(peak)
  rgb = folder.to_rgb(Image.fromarray(values))
  assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[..., 0], expected)


def test_non_finite_float_image_is_refused():
  with pytest.raises(ValueError, match='non-finite'):
    folder.to_rgb(Image.fromarray(np.array([[0, np.nan]], np.float32)))


def test_images_thinner_than_two_pixels_are_refused_as_bad(tmp_path, caplog):
  for name, size in (('a_line.png', (1, 5)), ('b_column.png', (5, 1)),
                     ('c_dot.gif', (1, 1))):
    write_image(tmp_path / name, size=size)
  write_image(tmp_path / 'd_tiny.png', value=77, size=(2, 2))
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.75)
  with caplog.at_level(logging.WARNING):
    record = source[0]
  assert record['image'].shape == (2, 2, 3) and record['image'].max() == 77
  assert source.num_skipped == 3
  for name in ('a_line.png', 'b_column.png', 'c_dot.gif'):
    assert name in caplog.text
  assert 'smaller than 2x2' in caplog.text


def test_class_folders_label_by_sorted_top_level_name(tmp_path):
  write_image(tmp_path / 'zebra' / 'deep' / 'one.png')
  write_image(tmp_path / 'ant' / 'two.png')
  write_image(tmp_path / 'moth' / 'three.png')
  source = folder.ImageFolder(tmp_path)
  assert source.class_names == ('ant', 'moth', 'zebra')
  labels = {f: int(source[i]['label']) for i, f in enumerate(source.files)}
  assert labels == {'ant/two.png': 0, 'moth/three.png': 1,
                    'zebra/deep/one.png': 2}


def test_empty_label_column_gives_no_labels(tmp_path):
  write_image(tmp_path / 'cls' / 'a.png')
  write_csv(tmp_path / 'labels.csv', ['filename', 'label'], [['cls/a.png', 3]])
  source = folder.ImageFolder(tmp_path, label_column='')
  assert source.labels is None
  assert 'label' not in source[0]


def test_csv_rows_match_by_relative_path_or_basename(tmp_path):
  write_image(tmp_path / 'sub' / 'a.png')
  write_image(tmp_path / 'sub' / 'b.png')
  write_csv(tmp_path / 'labels.csv', ['filename', 'label'],
            [['sub/a.png', 4], ['b.png', 7]])
  source = folder.ImageFolder(tmp_path)
  assert [int(source[i]['label']) for i in range(2)] == [4, 7]


def test_image_missing_from_csv_raises_data_error_naming_it(tmp_path):
  write_image(tmp_path / 'a.png')
  write_image(tmp_path / 'orphan.png')
  write_csv(tmp_path / 'labels.csv', ['filename', 'label'], [['a.png', 1]])
  with pytest.raises(errors.DataError, match='orphan.png'):
    folder.ImageFolder(tmp_path)


def test_csv_without_label_column_raises_data_error_naming_column(tmp_path):
  write_image(tmp_path / 'a.png')
  write_csv(tmp_path / 'labels.csv', ['filename', 'age'], [['a.png', 1]])
  with pytest.raises(errors.DataError, match="'label'"):
    folder.ImageFolder(tmp_path)


def test_non_integer_csv_label_raises_data_error(tmp_path):
  write_image(tmp_path / 'a.png')
  write_csv(tmp_path / 'labels.csv', ['filename', 'label'], [['a.png', 'cat']])
  with pytest.raises(errors.DataError, match="'cat'"):
    folder.ImageFolder(tmp_path)


def test_missing_path_raises_data_error_naming_it(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(errors.DataError, match='nowhere'):
    folder.ImageFolder(missing)
  with pytest.raises(errors.DataError, match='data.path'):
    folder.ImageFolder('')


def test_directory_without_images_raises_data_error_naming_it(tmp_path):
  empty = tmp_path / 'empty_dir'
  empty.mkdir()
  with pytest.raises(errors.DataError, match='empty_dir'):
    folder.ImageFolder(empty)
  (empty / 'readme.txt').write_text('no images here')
  with pytest.raises(errors.DataError, match='no image files'):
    folder.ImageFolder(empty)


def test_file_path_raises_data_error(tmp_path):
  a_file = write_image(tmp_path / 'a.png')
  with pytest.raises(errors.DataError, match='not a directory'):
    folder.ImageFolder(a_file)


def test_corrupt_image_is_skipped_with_warning_and_counted(tmp_path, caplog):
  write_image(tmp_path / '0.png', value=0)
  (tmp_path / '1_corrupt.png').write_bytes(b'definitely not a png')
  write_image(tmp_path / '2.png', value=200)
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.5)
  assert len(source) == 3 and source.num_skipped == 0
  with caplog.at_level(logging.WARNING):
    record = source[1]
  np.testing.assert_array_equal(record['image'], source[2]['image'])
  assert source.num_skipped == 1
  assert '1_corrupt.png' in caplog.text
  source[1]  # A known bad file is not counted twice.
  assert source.num_skipped == 1
  assert source[0]['image'].max() == 0


def test_truncated_jpeg_is_skipped_and_last_index_wraps_around(tmp_path):
  write_image(tmp_path / 'a.jpg', value=30, fmt='JPEG')
  good = write_image(tmp_path / 'b.jpg', size=(64, 64), fmt='JPEG')
  (tmp_path / 'c.jpg').write_bytes(good.read_bytes()[:200])
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.5)
  np.testing.assert_array_equal(source[2]['image'], source[0]['image'])
  assert source.num_skipped == 1


def test_folder_of_only_corrupt_files_raises_data_error(tmp_path):
  (tmp_path / 'a.png').write_bytes(b'junk')
  (tmp_path / 'b.jpg').write_bytes(b'')
  source = folder.ImageFolder(tmp_path, max_bad_fraction=1.0)
  with pytest.raises(errors.DataError, match='could be decoded'):
    source[0]
  assert source.num_skipped == 2


def test_skipped_image_keeps_label_of_the_image_returned(tmp_path):
  write_image(tmp_path / 'cat' / 'bad.png').write_bytes(b'junk')
  write_image(tmp_path / 'dog' / 'good.png')
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.5)
  assert source.class_names == ('cat', 'dog')
  assert source[0]['label'] == 1


def write_folder(root, num_good, bad_names):
  """num_good small PNGs plus one corrupt file per name in bad_names."""
  for i in range(num_good):
    write_image(root / f'good_{i:02d}.png', value=i, size=(10, 12))
  good = (root / 'good_00.png').read_bytes()
  for i, name in enumerate(bad_names):
    # Alternate garbage and truncated files.
    (root / name).write_bytes(b'garbage' if i % 2 else good[:40])
  return root


def test_bad_files_at_the_fraction_are_skipped_and_counted(tmp_path):
  write_folder(tmp_path, 9, ['bad.png'])
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.1)  # 1 of 10.
  images = [source[i]['image'] for i in range(len(source))]
  assert all(image.shape == (12, 10, 3) for image in images)
  assert source.num_skipped == 1


def test_skipped_paths_name_the_bad_files_in_the_order_met(tmp_path):
  write_folder(tmp_path, 8, ['bad_a.jpg', 'bad_b.png'])
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.2)
  source[1]
  source[0]
  assert source.skipped_paths == (str(tmp_path / 'bad_b.png'),
                                  str(tmp_path / 'bad_a.jpg'))


def test_bad_files_above_the_fraction_raise_data_error_listing_them(tmp_path):
  write_folder(tmp_path, 8, ['bad_a.jpg', 'z_bad.png'])
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.1)  # 2 of 10.
  source[0]  # The first bad file is tolerated.
  assert source.num_skipped == 1
  with pytest.raises(errors.DataError) as raised:
    source[9]
  message = str(raised.value)
  assert '2 of 10 images' in message and str(tmp_path) in message
  assert 'max_bad_fraction=0.1' in message
  assert 'bad_a.jpg, z_bad.png' in message and '\n' not in message
  with pytest.raises(errors.DataError, match='z_bad.png'):
    source[5]  # Every later read raises too, even of a good file.


def test_zero_fraction_raises_at_the_first_bad_file(tmp_path):
  write_folder(tmp_path, 99, ['bad.png'])
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.0)
  with pytest.raises(errors.DataError, match='1 of 100 images.*bad.png'):
    source[0]


def test_error_names_ten_bad_files_and_counts_the_rest(tmp_path):
  bad = [f'bad_{i:02d}.png' for i in range(12)]
  write_folder(tmp_path, 8, bad)
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.55)  # 11 of 20.
  with pytest.raises(errors.DataError) as raised:
    source[0]
  message = str(raised.value)
  assert ', '.join(bad[:10]) + ' ... and 2 more' in message
  assert 'bad_10.png' not in message


def test_out_of_range_fraction_raises_value_error(tmp_path):
  write_image(tmp_path / 'a.png')
  with pytest.raises(ValueError, match='max_bad_fraction'):
    folder.ImageFolder(tmp_path, max_bad_fraction=1.5)


def test_source_pickles_with_its_bad_file_count(tmp_path):
  write_folder(tmp_path, 3, ['bad.png'])
  source = folder.ImageFolder(tmp_path, max_bad_fraction=0.5)
  source[0]
  copy = pickle.loads(pickle.dumps(source))  # As grain sends it to workers.
  assert copy.skipped_paths == source.skipped_paths
  np.testing.assert_array_equal(copy[3]['image'], source[3]['image'])


def test_pipeline_skips_bad_files_below_the_fraction(make_data_config,
                                                     tmp_path):
  write_folder(tmp_path, 18, ['bad_a.png', 'bad_b.jpg'])
  config = make_data_config(source='folder', path=str(tmp_path), image_size=8,
                            max_bad_fraction=0.1)
  source = pipeline.make_source(config)
  iterator = pipeline.make_iterator(config, batch_size=4, seed=0,
                                    source=source)
  batches = [next(iterator) for _ in range(10)]  # Two epochs.
  assert all(b['image'].shape == (4, 8, 8, 3) for b in batches)
  assert source.num_skipped == 2
  assert sorted(source.skipped_paths) == [str(tmp_path / 'bad_a.png'),
                                          str(tmp_path / 'bad_b.jpg')]


def test_pipeline_raises_data_error_above_the_fraction(make_data_config,
                                                       tmp_path):
  write_folder(tmp_path, 17, ['bad_a.png', 'bad_b.jpg', 'bad_c.png'])
  config = make_data_config(source='folder', path=str(tmp_path), image_size=8)
  iterator = pipeline.make_iterator(config, batch_size=4, seed=0)
  with pytest.raises(errors.DataError) as raised:
    for _ in range(10):
      next(iterator)
  message = str(raised.value)
  assert 'max_bad_fraction=0.01' in message and str(tmp_path) in message
  assert 'bad_' in message
