"""Tests for the image-folder source."""

import csv
import logging

import numpy as np
from PIL import Image
import pytest

from latent_diffusion import errors
from latent_diffusion.data import folder

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


def test_grey_and_rgba_images_are_converted_to_rgb(tmp_path):
  write_image(tmp_path / 'grey.png', value=10, mode='L')
  write_image(tmp_path / 'rgba.png', mode='RGBA', size=(5, 7))
  source = folder.ImageFolder(tmp_path)
  for index, shape in ((0, (6, 8, 3)), (1, (7, 5, 3))):
    image = source[index]['image']
    assert image.shape == shape and image.dtype == np.uint8


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
  source = folder.ImageFolder(tmp_path)
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
  source = folder.ImageFolder(tmp_path)
  np.testing.assert_array_equal(source[2]['image'], source[0]['image'])
  assert source.num_skipped == 1


def test_folder_of_only_corrupt_files_raises_data_error(tmp_path):
  (tmp_path / 'a.png').write_bytes(b'junk')
  (tmp_path / 'b.jpg').write_bytes(b'')
  source = folder.ImageFolder(tmp_path)
  with pytest.raises(errors.DataError, match='could be decoded'):
    source[0]
  assert source.num_skipped == 2


def test_skipped_image_keeps_label_of_the_image_returned(tmp_path):
  write_image(tmp_path / 'cat' / 'bad.png').write_bytes(b'junk')
  write_image(tmp_path / 'dog' / 'good.png')
  source = folder.ImageFolder(tmp_path)
  assert source.class_names == ('cat', 'dog')
  assert source[0]['label'] == 1
