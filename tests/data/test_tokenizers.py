"""Tests for data/tokenizers.py: WordPiece against transformers' BertTokenizerFast, the synthetic
captions' word tokenizer, layout tokens against taming-transformers' ObjectsBoundingBoxConditionalBuilder
(the taming-transformers-hugf package), make_tokenizer's dispatch and config checks."""

import logging
import random
import sys
import types
import warnings

import numpy as np
import pytest
from transformers import BertTokenizerFast

from configs import base
from latent_diffusion.data import synthetic
from latent_diffusion.data.tokenizers import (LayoutTokenizer, WordPieceTokenizer, WordTokenizer,
                                              make_tokenizer)
from latent_diffusion.errors import ConfigError

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'the', 'red', 'circle', 'left', 'of', 'blue',
         'square', 'cafe', 're', '##sume', 'walk', '##ing', '##s', 'cat', 'don', "'", 't', '.', ',', '!',
         '?', '-', '(', ')', 'naive', '一', 'x', '##x']
CAPTIONS = [
    'a red circle left of a blue square',
    'The RED Circle, left of: a BLUE square!',
    'Café résumé — naïve CATS walking (fast)?',
    "don't walk-walking... x xx xxxx",
    'zebra unknown words ß 一二 [MASK] x[UNK]x',
    '  tabs\tand\nnewlines\r\u00a0nbsp\u3000ideographic\u2028line\x0bvt\x85nel\x00nul\ufffd ',
    'a ' * 40 + 'circle',  # truncated
    '',
    'x' * 101,  # longer than WordPiece's 100 characters: [UNK] whole
]


@pytest.fixture(scope='module')
def vocab_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('bert') / 'vocab.txt'
  path.write_text('\n'.join(VOCAB) + '\n', encoding='utf-8')
  return path


def bert_ids(vocab_path, texts, max_length):
  """The paper's BERTTokenizer call on a local vocab.txt (from_pretrained of its folder: transformers
  5 ignores a `vocab_file` argument of the constructor)."""
  reference = BertTokenizerFast.from_pretrained(str(vocab_path.parent), do_lower_case=True)
  return np.asarray(reference(texts, truncation=True, max_length=max_length,
                              padding='max_length')['input_ids'])


@pytest.mark.parametrize('max_length', [16, 77])
def test_wordpiece_equals_bert_tokenizer_fast(vocab_path, max_length):
  got = WordPieceTokenizer(str(vocab_path), max_length).encode(CAPTIONS)
  want = bert_ids(vocab_path, CAPTIONS, max_length)
  assert got.dtype == np.int32 and got.shape == (len(CAPTIONS), max_length)
  np.testing.assert_array_equal(got, want)


def test_wordpiece_equals_bert_tokenizer_fast_on_random_unicode_text(vocab_path):
  pieces = list('abxtc .,!-\'()?ÉéÜüΣσ') + [
      '\u4e00', '\u3000', '\u2028', '\x0b', '\x85', '\x00', '\ufffd', '\u0301', '\u200b', 'İ', 'ﬁ', '\t',
      '[MASK]', '[UNK]', 'walking', 'Café', '\U0002B820', '\U0002B920', '\x1c', 'ß']
  rng = random.Random(0)
  texts = [''.join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(300)]
  np.testing.assert_array_equal(WordPieceTokenizer(str(vocab_path), 20).encode(texts),
                                bert_ids(vocab_path, texts, 20))


def test_wordpiece_null_tokens_are_the_empty_caption(vocab_path):
  tokenizer = WordPieceTokenizer(str(vocab_path), 6)
  np.testing.assert_array_equal(tokenizer.null_tokens(), [2, 3, 0, 0, 0, 0])
  np.testing.assert_array_equal(tokenizer.null_tokens(), bert_ids(vocab_path, [''], 6)[0])


def test_wordpiece_warns_once_naming_unknown_words(vocab_path, caplog):
  tokenizer = WordPieceTokenizer(str(vocab_path), 16)
  with caplog.at_level(logging.WARNING):
    tokenizer.encode(['a zebra and a red circle', 'zebra quokka'])
  warnings = [record for record in caplog.records if 'became [UNK]' in record.getMessage()]
  assert len(warnings) == 1
  message = warnings[0].getMessage()
  assert "'zebra'" in message and "'quokka'" in message and "'and'" in message
  assert "'red'" not in message
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tokenizer.encode(['a red circle'])
  assert 'became [UNK]' not in caplog.text


def test_wordpiece_missing_vocab_names_path_and_field(tmp_path):
  missing = tmp_path / 'nowhere' / 'vocab.txt'
  with pytest.raises(ConfigError, match='cond_stage.vocab_path') as error:
    WordPieceTokenizer(str(missing), 77)
  assert str(missing) in str(error.value)
  with pytest.raises(ConfigError, match='cond_stage.vocab_path'):
    WordPieceTokenizer('', 77)


def test_wordpiece_vocab_without_special_tokens_is_refused(tmp_path):
  path = tmp_path / 'vocab.txt'
  path.write_text('[PAD]\n[UNK]\nthe\n')
  with pytest.raises(ConfigError, match=r'\[CLS\], \[SEP\]'):
    WordPieceTokenizer(str(path), 8)


# ---------------------------------------------------------------------------------------------------


def test_word_tokenizer_ids_follow_the_vocabulary_order():
  tokenizer = WordTokenizer(['red', 'circle', 'Left', 'of'], max_length=6)
  assert tokenizer.vocab_size == 6
  got = tokenizer.encode(['Red circle, LEFT of... red!', '', 'red red red red red red red red'])
  np.testing.assert_array_equal(got, [[2, 3, 4, 5, 2, 0], [0] * 6, [2] * 6])
  np.testing.assert_array_equal(tokenizer.null_tokens(), np.zeros(6, np.int32))


def test_word_tokenizer_maps_unknown_words_to_unk_with_a_warning(caplog):
  tokenizer = WordTokenizer(['red', 'circle'], max_length=4)
  with caplog.at_level(logging.WARNING):
    got = tokenizer.encode(['red hexagon circle'])
  np.testing.assert_array_equal(got, [[2, 1, 3, 0]])
  assert "'hexagon'" in caplog.text and "'red'" not in caplog.text.split('[UNK]')[-1]


def test_word_tokenizer_refuses_repeated_words():
  with pytest.raises(ValueError, match="'red'"):
    WordTokenizer(['red', 'Red'], 4)


def test_synthetic_caption_vocabulary_covers_every_caption_without_unk():
  tokenizer = WordTokenizer.for_synthetic_captions(max_length=32)
  captions = [synthetic.make_example(3, index, image_size=32)['caption'] for index in range(150)]
  assert any(' and ' in caption for caption in captions)  # 3-object captions were drawn
  tokens = tokenizer.encode(captions)
  assert not np.any(tokens == WordTokenizer.UNK_ID)
  lengths = (tokens != WordTokenizer.PAD_ID).sum(axis=1)
  np.testing.assert_array_equal(lengths, [len(caption.split()) for caption in captions])
  # Fixed ids: the grammar's words first, then colours and shapes in the module's order.
  assert tokenizer.words[:2] == ('a', 'an')
  assert tokenizer.vocab[synthetic.SHAPES[-1]] == tokenizer.vocab_size - 1
  assert WordTokenizer.for_synthetic_captions(8).vocab == tokenizer.vocab


# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def builder_module():
  """taming-transformers' conditional builder (the taming-transformers-hugf package). Its
  image_transforms module (used only for plotting) imports a torchvision function that torchvision
  0.28 no longer has, so a stand-in takes its place."""
  name = 'taming_transformers_hugf.taming.data.image_transforms'
  stand_in = types.ModuleType(name)
  stand_in.convert_pil_to_tensor = None
  saved = sys.modules.get(name)
  sys.modules[name] = stand_in
  try:
    # pylint: disable=g-import-not-at-top
    from taming_transformers_hugf.taming.data.conditional_builder import objects_bbox
    from taming_transformers_hugf.taming.data import helper_types
  finally:
    if saved is None:
      del sys.modules[name]
    else:
      sys.modules[name] = saved
  return objects_bbox, helper_types


def builder_tokens(builder_module, boxes, vocab_size, num_classes, max_objects, encode_crop, monkeypatch):
  """The builder's build() of our (class, x0, y0, x1, y1) rows, without its shuffle."""
  objects_bbox, helper_types = builder_module
  builder = objects_bbox.ObjectsBoundingBoxConditionalBuilder(num_classes, max_objects, vocab_size,
                                                              encode_crop, False, False)
  annotations = []
  for label, x0, y0, x1, y1 in np.asarray(boxes, np.float64).tolist():
    if label >= 0:  # the builder's bbox is (x0, y0, w, h)
      annotations.append(helper_types.Annotation(area=(x1 - x0) * (y1 - y0), image_id='0',
                                                 bbox=(x0, y0, x1 - x0, y1 - y0), category_no=int(label),
                                                 category_id=str(int(label))))
  monkeypatch.setattr(random, 'shuffle', lambda items: None)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # 'Did not receive any annotations.'
    return builder.build(annotations).numpy(), builder


def random_boxes(rng, count, num_classes, pad_to):
  # (n, [min, max], [x, y])
  corners = np.sort(rng.uniform(0, 1, size=(count, 2, 2)).astype(np.float32), axis=1)
  boxes = np.full((pad_to, 5), synthetic.BOX_PADDING, np.float32)
  boxes[:count, 0] = rng.integers(0, num_classes, size=count)
  boxes[:count, 1:3] = corners[:, 0]
  boxes[:count, 3:5] = corners[:, 1]
  return boxes


@pytest.mark.parametrize('vocab_size,num_classes,max_objects,encode_crop', [
    (8192, 601, 30, True),   # the paper's layout2img-openimages256
    (8192, 601, 30, False),
    (300, 6, 3, True),       # a small grid (17 x 17) for the synthetic set
])
def test_layout_tokens_equal_the_builders(builder_module, monkeypatch, vocab_size, num_classes, max_objects,
                                          encode_crop):
  tokenizer = LayoutTokenizer(vocab_size, num_classes, max_objects, encode_crop)
  rng = np.random.default_rng(vocab_size + max_objects)
  for count in (0, 1, max_objects // 2, max_objects):
    boxes = random_boxes(rng, count, num_classes, pad_to=max_objects + 2)
    want, builder = builder_tokens(builder_module, boxes, vocab_size, num_classes, max_objects, encode_crop,
                                   monkeypatch)
    got = tokenizer.encode(boxes)
    assert got.dtype == np.int32 and got.shape == (builder.embedding_dim,) == (tokenizer.max_length,)
    np.testing.assert_array_equal(got, want)
  assert tokenizer.pad_id == builder.none


def test_layout_corners_on_grid_points_and_half_steps_round_as_the_builder(builder_module, monkeypatch):
  tokenizer = LayoutTokenizer(16 + 1, 3, 4, True)  # a 4 x 4 grid: steps of 1/3
  boxes = np.array([[0, 0, 0, 1, 1], [1, 1 / 6, 0.5, 5 / 6, 0.5 + 1e-3], [2, 1 / 3, 2 / 3, 2 / 3, 1],
                    [1, 0.25, 0.75, 0.75, 0.875]], np.float32)
  want, _ = builder_tokens(builder_module, boxes, 17, 3, 4, True, monkeypatch)
  np.testing.assert_array_equal(tokenizer.encode(boxes), want)


def test_layout_null_tokens_are_padding_and_the_full_crop(builder_module, monkeypatch):
  tokenizer = LayoutTokenizer(8192, 601, 30, True)
  null = tokenizer.null_tokens()
  assert tokenizer.max_length == 92
  np.testing.assert_array_equal(null[:90], np.full(90, 8191))
  np.testing.assert_array_equal(null[90:], [0, 90 * 90 - 1])
  want, _ = builder_tokens(builder_module, np.zeros((0, 5)), 8192, 601, 30, True, monkeypatch)
  np.testing.assert_array_equal(null, want)


def test_layout_decode_round_trips_within_half_a_grid_step(builder_module):
  tokenizer = LayoutTokenizer(8192, 601, 30, True)
  boxes = random_boxes(np.random.default_rng(1), 7, 601, pad_to=30)
  decoded = tokenizer.decode(tokenizer.encode(boxes))
  assert decoded.shape == (30, 5) and decoded.dtype == np.float32
  np.testing.assert_array_equal(decoded[:, 0], boxes[:, 0])
  np.testing.assert_allclose(decoded[:7, 1:], boxes[:7, 1:], atol=0.5 / 89 + 1e-6)
  np.testing.assert_array_equal(decoded[7:], synthetic.BOX_PADDING)
  # The builder's inverse_build reads the same boxes back (as x0, y0, w, h).
  objects_bbox, _ = builder_module
  builder = objects_bbox.ObjectsBoundingBoxConditionalBuilder(601, 30, 8192, True, False, False)
  import torch  # pylint: disable=g-import-not-at-top
  objects, crop = builder.inverse_build(torch.from_numpy(tokenizer.encode(boxes).astype(np.int64)))
  assert crop == (0.0, 0.0, 1.0, 1.0)
  assert [label for label, _ in objects] == boxes[:7, 0].astype(int).tolist()
  np.testing.assert_allclose([(x0, y0, x0 + w, y0 + h) for _, (x0, y0, w, h) in objects], decoded[:7, 1:],
                             atol=1e-6)


def test_layout_box_is_told_from_padding_by_its_class_where_a_corner_shares_the_padding_id():
  tokenizer = LayoutTokenizer(1024, 6, 3, True)  # a 32 x 32 grid: the corner (1, 1) is token 1023
  boxes = np.array([[4, 0.5, 0.5, 1.0, 1.0], [0, 0.0, 0.0, 0.25, 0.25]], np.float32)
  tokens = tokenizer.encode(boxes)
  assert tokens[2] == tokenizer.pad_id == tokens[-1] == 1023
  decoded = tokenizer.decode(tokens)
  np.testing.assert_allclose(decoded[:2], boxes, atol=0.5 / 31)
  np.testing.assert_array_equal(decoded[2], synthetic.BOX_PADDING)


def test_layout_tokens_are_in_range_and_batches_stack():
  tokenizer = LayoutTokenizer(300, 6, 3, True)
  batch = np.stack([synthetic.make_example(0, index, image_size=32)['boxes'] for index in range(20)])
  tokens = tokenizer.encode_batch(batch)
  assert tokens.shape == (20, 11) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < 300
  np.testing.assert_array_equal(tokens[3], tokenizer.encode(batch[3]))
  classes = tokens[:, 0:9:3]
  np.testing.assert_array_equal(np.where(batch[:, :, 0] >= 0, batch[:, :, 0], 299), classes)


@pytest.mark.parametrize('row,match', [
    ([6, 0.1, 0.1, 0.5, 0.5], r'class 6 is not an integer in \[0, 6\)'),
    ([1.5, 0.1, 0.1, 0.5, 0.5], r'class 1.5 is not an integer in \[0, 6\)'),
    ([1, -0.1, 0.1, 0.5, 0.5], r'x0=-0.1 of class 1 is outside \[0, 1\]'),
    ([1, 0.1, 0.1, 1.25, 0.5], r'x1=1.25 .* outside \[0, 1\]'),
    ([1, 0.1, 0.1, 0.5, np.nan], r'y1=nan .* outside \[0, 1\]'),
    ([1, 0.5, 0.1, 0.5, 0.5], r'empty: it needs x0 < x1 and y0 < y1'),
    ([1, 0.1, 0.6, 0.5, 0.5], r'y0=0.6'),
])
def test_layout_refuses_bad_boxes_naming_value_and_range(row, match):
  tokenizer = LayoutTokenizer(300, 6, 3, True)
  boxes = np.array([[0, 0.2, 0.2, 0.4, 0.4], row], np.float32)
  with pytest.raises(ValueError, match=match):
    tokenizer.encode(boxes)


def test_layout_keeps_the_first_max_objects_boxes_with_a_warning(caplog):
  tokenizer = LayoutTokenizer(300, 6, 2, False)
  boxes = np.array([[k, 0.1, 0.1, 0.5, 0.5] for k in range(4)], np.float32)
  with caplog.at_level(logging.WARNING):
    tokens = tokenizer.encode(boxes)
  np.testing.assert_array_equal(tokens[0::3], [0, 1])
  assert 'max_objects=2' in caplog.text


@pytest.mark.parametrize('vocab_size,num_classes,match', [
    (3, 2, 'at least 4 tokens'),
    (30, 30, r'30 object classes do not fit the 29 ids below the padding id 29'),
])
def test_layout_vocabulary_too_small_is_a_config_error(vocab_size, num_classes, match):
  with pytest.raises(ConfigError, match=match):
    LayoutTokenizer(vocab_size, num_classes, 3, True)


# ---------------------------------------------------------------------------------------------------


def cond_stage(**fields):
  config = base.get_config()
  for name, value in fields.items():
    setattr(config.cond_stage, name, value)
  return config.cond_stage


def test_make_tokenizer_dispatches_on_key_and_tokenizer(vocab_path):
  wordpiece = make_tokenizer(cond_stage(key='caption', tokenizer='wordpiece', vocab_path=str(vocab_path),
                                        max_seq_len=12))
  assert isinstance(wordpiece, WordPieceTokenizer) and wordpiece.max_length == 12
  word = make_tokenizer(cond_stage(key='caption', tokenizer='word', max_seq_len=16))
  assert isinstance(word, WordTokenizer) and word.max_length == 16
  layout = make_tokenizer(cond_stage(key='layout', vocab_size=8192, layout_max_objects=30,
                                     layout_encode_crop=True, max_seq_len=92))
  assert isinstance(layout, LayoutTokenizer) and layout.num_classes == synthetic.NUM_CLASSES
  openimages = make_tokenizer(cond_stage(key='layout', vocab_size=8192, max_seq_len=92), num_classes=601)
  assert openimages.num_classes == 601
  for key in ('label', 'segmentation', 'low_res', 'masked_image'):
    assert make_tokenizer(cond_stage(key=key)) is None


def test_make_tokenizer_config_errors_name_the_fields(vocab_path):
  with pytest.raises(ConfigError, match=r'cond_stage.max_seq_len=77 .* 92 tokens .*layout_max_objects=30'):
    make_tokenizer(cond_stage(key='layout', vocab_size=8192, layout_max_objects=30, max_seq_len=77))
  with pytest.raises(ConfigError, match=r'cond_stage.max_seq_len=92 .* 90 tokens'):
    make_tokenizer(cond_stage(key='layout', vocab_size=8192, layout_encode_crop=False, max_seq_len=92))
  with pytest.raises(ConfigError, match='cond_stage.tokenizer'):
    make_tokenizer(cond_stage(key='caption', tokenizer='sentencepiece'))
  with pytest.raises(ConfigError, match=r'cond_stage.vocab_size=20 .* 34 tokens'):
    make_tokenizer(cond_stage(key='caption', tokenizer='wordpiece', vocab_path=str(vocab_path),
                              vocab_size=20))
  with pytest.raises(ConfigError, match='cond_stage.vocab_path'):
    make_tokenizer(cond_stage(key='caption', tokenizer='wordpiece', vocab_path=''))
