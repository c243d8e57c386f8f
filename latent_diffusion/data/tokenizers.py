"""Host-side tokenizers of the conditional LDMs (numpy): what the paper's TransformerEmbedder reads.

  WordPieceTokenizer  captions -> BERT WordPiece ids, as the paper's BERTTokenizer (bert-base-uncased
                      through transformers.BertTokenizerFast): [CLS] ... [SEP] [PAD]...
  WordTokenizer       captions -> one id per word of a fixed word list (the synthetic set's captions)
  LayoutTokenizer     boxes -> the paper's layout tokens (`coordinates_bbox` of layout2img-openimages256,
                      taming-transformers' ObjectsBoundingBoxConditionalBuilder)

Each has `max_length`, `vocab_size` (ids lie in [0, vocab_size)) and `null_tokens()`, the tokens of the
empty condition (the '' caption, no boxes) that classifier-free guidance uses. `make_tokenizer` builds
the one a config's `cond_stage` asks for.
"""

import math
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import logging

from latent_diffusion.data import synthetic
from latent_diffusion.errors import ConfigError


def _pad(ids: list[int], max_length: int, pad_id: int) -> list[int]:
  return ids[:max_length] + [pad_id] * (max_length - len(ids))


def _warn_unknown(tokenizer: str, words: dict, where: str) -> None:
  if words:
    shown = ', '.join(repr(word) for word in list(words)[:20])
    more = f' and {len(words) - 20} more' if len(words) > 20 else ''
    logging.warning('%s: words not in %s became [UNK]: %s%s', tokenizer, where, shown, more)


# ---------------------------------------------------------------------------------------------------
# BERT WordPiece.

# CJK Unified Ideographs (and extensions, compatibility ideographs) that BERT splits into single
# tokens: the ranges of the `tokenizers` library's BertNormalizer (which BertTokenizerFast runs).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
_REQUIRED_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]')
_MAX_WORD_CHARS = 100  # longer words are [UNK] whole (WordPiece's max_input_chars_per_word)


def _is_cjk(char: str) -> bool:
  code = ord(char)
  return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_control(char: str) -> bool:
  return char not in '\t\n\r' and unicodedata.category(char).startswith('C')


def _is_whitespace(char: str) -> bool:
  return char in ' \t\n\r' or unicodedata.category(char) in ('Zs', 'Zl', 'Zp')


def _is_punctuation(char: str) -> bool:
  code = ord(char)
  if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
    return True
  return unicodedata.category(char).startswith('P')


def bert_normalize(text: str) -> str:
  """BertNormalizer(clean_text, handle_chinese_chars, strip_accents, lowercase), in its order: drop
  NUL, U+FFFD and control characters, whitespace to ' ', spaces around CJK ideographs, NFD without
  nonspacing marks, then per-character lowercase."""
  chars = []
  for char in text:
    if char in '\x00\ufffd' or _is_control(char):
      continue
    if _is_whitespace(char):
      chars.append(' ')
    elif _is_cjk(char):
      chars.append(f' {char} ')
    else:
      chars.append(char)
  text = unicodedata.normalize('NFD', ''.join(chars))
  return ''.join(char.lower() for char in text if unicodedata.category(char) != 'Mn')


def bert_pre_tokenize(text: str) -> list[str]:
  """BertPreTokenizer on normalized text: split on whitespace, each punctuation character its own word."""
  words = []
  for chunk in text.split():
    word = ''
    for char in chunk:
      if _is_punctuation(char):
        if word:
          words.append(word)
        words.append(char)
        word = ''
      else:
        word += char
    if word:
      words.append(word)
  return words


class WordPieceTokenizer:
  """BERT uncased WordPiece over a `vocab.txt` (one token a line, its id the line number).

  `encode(texts)` equals transformers.BertTokenizerFast(vocab, do_lower_case=True)(texts,
  truncation=True, max_length=max_length, padding='max_length')['input_ids']: basic tokenization
  (bert_normalize, bert_pre_tokenize; the special tokens [CLS] [SEP] [PAD] [UNK] [MASK] written in a
  text stay single tokens, as the fast tokenizer's added vocabulary matches them first), greedy
  longest-match WordPiece with '##' continuations (a word with no full split is [UNK]), [CLS] ...
  [SEP] truncated to max_length and padded with [PAD].
  """

  def __init__(self, vocab_path: str, max_length: int = 77):
    path = Path(vocab_path) if vocab_path else None
    if path is None or not path.is_file():
      raise ConfigError(f'cond_stage.vocab_path: the BERT vocabulary {str(vocab_path)!r} does not exist '
                        '(give the path of a vocab.txt, e.g. bert-base-uncased\'s with 30522 tokens)')
    if max_length < 2:
      raise ConfigError(f'cond_stage.max_seq_len={max_length}: a WordPiece caption needs at least 2 '
                        'tokens ([CLS] and [SEP])')
    with open(path, encoding='utf-8') as file:
      lines = file.readlines()
    self.vocab = {line.rstrip('\n'): index for index, line in enumerate(lines)}
    missing = [token for token in _REQUIRED_TOKENS if token not in self.vocab]
    if missing:
      raise ConfigError(f'cond_stage.vocab_path: {path} lacks the special tokens {", ".join(missing)}')
    self.path = path
    self.max_length = int(max_length)
    self.vocab_size = len(lines)
    self.pad_id, self.unk_id = self.vocab['[PAD]'], self.vocab['[UNK]']
    self.cls_id, self.sep_id = self.vocab['[CLS]'], self.vocab['[SEP]']
    specials = [token for token in _SPECIAL_TOKENS if token in self.vocab]
    self._special_split = re.compile('(' + '|'.join(map(re.escape, specials)) + ')')
    self._word_ids: dict[str, tuple[int, ...]] = {}

  def _wordpiece(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-tokenized word; (unk_id,) when it has no split into vocabulary pieces."""
    if word in self._word_ids:
      return self._word_ids[word]
    ids, start = [], 0
    if len(word) > _MAX_WORD_CHARS:
      ids = None
    while ids is not None and start < len(word):
      for end in range(len(word), start, -1):
        piece = word[start:end] if start == 0 else '##' + word[start:end]
        if piece in self.vocab:
          ids.append(self.vocab[piece])
          start = end
          break
      else:
        ids = None
    result = (self.unk_id,) if ids is None else tuple(ids)
    if len(self._word_ids) < 100_000:
      self._word_ids[word] = result
    return result

  def tokenize(self, text: str, unknown: dict | None = None) -> list[int]:
    """Ids of `text` without [CLS]/[SEP], untruncated; words that become [UNK] are added to `unknown`."""
    ids = []
    for part in self._special_split.split(text):
      if part in self.vocab and part in _SPECIAL_TOKENS:
        ids.append(self.vocab[part])
        continue
      for word in bert_pre_tokenize(bert_normalize(part)):
        pieces = self._wordpiece(word)
        if pieces == (self.unk_id,) and unknown is not None:
          unknown[word] = None
        ids.extend(pieces)
    return ids

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 (N, max_length) ids of `texts`. Logs one warning naming the words that became [UNK]."""
    if isinstance(texts, str):
      raise TypeError('WordPieceTokenizer.encode takes a sequence of strings, not one string')
    unknown: dict = {}
    rows = []
    for text in texts:
      ids = [self.cls_id] + self.tokenize(str(text), unknown)[:self.max_length - 2] + [self.sep_id]
      rows.append(_pad(ids, self.max_length, self.pad_id))
    _warn_unknown('WordPieceTokenizer', unknown, str(self.path))
    return np.asarray(rows, np.int32).reshape(len(rows), self.max_length)

  def null_tokens(self) -> np.ndarray:
    """int32 (max_length,): the empty caption, [CLS] [SEP] [PAD]..."""
    return self.encode([''])[0]


# ---------------------------------------------------------------------------------------------------
# Words of a fixed list.

# Every word the synthetic captions use (data/synthetic.py `caption`): articles, the joining words,
# the relations ('left of', 'right of', 'above', 'below'), then the colours and shapes in the order
# of the module's tuples. Fixed, so that ids never depend on the data seen.
SYNTHETIC_FUNCTION_WORDS = ('a', 'an', 'the', 'and', 'left', 'right', 'of', 'above', 'below')
_WORD = re.compile(r'[^\W_]+')  # runs of letters and digits: whitespace and punctuation separate


class WordTokenizer:
  """Word-level ids: 0 = [PAD], 1 = [UNK], then `vocabulary` in its order (lowercase). A text is
  lowercased and split into runs of letters and digits (whitespace and punctuation separate and are
  dropped), one id per word, truncated or padded with [PAD] to max_length. No [CLS]/[SEP]."""
  PAD_ID, UNK_ID = 0, 1

  def __init__(self, vocabulary: Sequence[str], max_length: int):
    words = [str(word).lower() for word in vocabulary]
    bad = [word for word in words if _WORD.fullmatch(word) is None]
    if bad:
      raise ValueError(f'WordTokenizer: {bad[0]!r} is not one word of letters and digits')
    if len(set(words)) != len(words):
      repeated = sorted({word for word in words if words.count(word) > 1})
      raise ValueError(f'WordTokenizer: the vocabulary repeats {", ".join(map(repr, repeated))}')
    if max_length < 1:
      raise ConfigError(f'cond_stage.max_seq_len={max_length}: a caption needs at least 1 token')
    self.words = tuple(words)
    self.vocab = {word: index + 2 for index, word in enumerate(words)}
    self.vocab_size = len(words) + 2
    self.max_length = int(max_length)

  @classmethod
  def for_synthetic_captions(cls, max_length: int) -> 'WordTokenizer':
    """The words of the synthetic set's captions (data/synthetic.py), in a fixed order."""
    return cls(SYNTHETIC_FUNCTION_WORDS + tuple(synthetic.COLOR_NAMES) + tuple(synthetic.SHAPES),
               max_length)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """int32 (N, max_length) ids of `texts`. Logs one warning naming the words that became [UNK]."""
    if isinstance(texts, str):
      raise TypeError('WordTokenizer.encode takes a sequence of strings, not one string')
    unknown: dict = {}
    rows = []
    for text in texts:
      words = _WORD.findall(str(text).lower())
      for word in words:
        if word not in self.vocab:
          unknown[word] = None
      ids = [self.vocab.get(word, self.UNK_ID) for word in words]
      rows.append(_pad(ids, self.max_length, self.PAD_ID))
    _warn_unknown('WordTokenizer', unknown, 'its vocabulary')
    return np.asarray(rows, np.int32).reshape(len(rows), self.max_length)

  def null_tokens(self) -> np.ndarray:
    """int32 (max_length,): the empty caption, all [PAD]."""
    return np.full((self.max_length,), self.PAD_ID, np.int32)


# ---------------------------------------------------------------------------------------------------
# Box layouts.

class LayoutTokenizer:
  """The paper's layout tokens: taming-transformers' ObjectsBoundingBoxConditionalBuilder (no group or
  extra parameters, the full image as crop), boxes kept in their order (the builder shuffles them).

  Token layout for vocab_size V (the builder's no_tokens):
    grid S = int(sqrt(V)) sections a side; a point (x, y) in [0, 1]^2 is the coordinate token
        round(y (S-1)) * S + round(x (S-1)), in [0, S^2) (round half to even, as Python's round);
    a box is 3 tokens: its class id (the class number itself: class and coordinate ids share the
        range, the position in the sequence tells them apart), the token of its top-left corner
        (x0, y0) and of its bottom-right corner (x1, y1);
    max_objects boxes, then padding triples of the padding id V - 1. Class ids stay below it, so the
        class slot tells a box from padding even where S^2 = V makes the corner (1, 1) the same id;
    with encode_crop, 2 more tokens: the crop's corners, for the full image (0, 0) and (1, 1):
        0 and S^2 - 1.
  So max_length = 3 max_objects (+ 2); the paper's OpenImages model: V = 8192 (S = 90), 30 boxes: 92.
  Boxes: float rows (class, x0, y0, x1, y1) in [0, 1] (the synthetic set's `boxes`); rows whose class
  is < 0 are padding and skipped.
  """

  def __init__(self, vocab_size: int, num_classes: int, max_objects: int, encode_crop: bool = True):
    """ConfigError unless vocab_size holds a grid of at least 2 x 2 and the class ids lie below the
    padding id (num_classes <= vocab_size - 1): classes and corners share ids, as in the builder."""
    vocab_size, num_classes, max_objects = int(vocab_size), int(num_classes), int(max_objects)
    sections = int(math.sqrt(vocab_size)) if vocab_size > 0 else 0
    if sections < 2:
      raise ConfigError(f'cond_stage.vocab_size={vocab_size}: a layout needs at least 4 tokens '
                        '(a grid of 2 x 2 coordinate tokens)')
    if not 1 <= num_classes <= vocab_size - 1:
      raise ConfigError(f'layout: {num_classes} object classes do not fit the {vocab_size - 1} ids '
                        f'below the padding id {vocab_size - 1} (cond_stage.vocab_size={vocab_size})')
    if max_objects < 1:
      raise ConfigError(f'cond_stage.layout_max_objects={max_objects}: must be at least 1')
    self.vocab_size = vocab_size
    self.num_classes = num_classes
    self.max_objects = max_objects
    self.encode_crop = bool(encode_crop)
    self.sections = sections
    self.pad_id = vocab_size - 1
    self.max_length = 3 * max_objects + (2 if self.encode_crop else 0)

  def coordinate_token(self, x, y) -> np.ndarray:
    """Token(s) of points (x, y) in [0, 1]: the builder's tokenize_coordinates."""
    steps = self.sections - 1
    x = np.rint(np.asarray(x, np.float64) * steps).astype(np.int64)
    y = np.rint(np.asarray(y, np.float64) * steps).astype(np.int64)
    return (y * self.sections + x).astype(np.int32)

  def token_coordinates(self, tokens) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) in [0, 1] of coordinate tokens: the builder's coordinates_from_token."""
    tokens = np.asarray(tokens, np.int64)
    steps = self.sections - 1
    return (tokens % self.sections) / steps, (tokens // self.sections) / steps

  def _valid_boxes(self, boxes) -> np.ndarray:
    """float64 (n, 5) rows of `boxes` whose class is >= 0, checked."""
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 5:
      raise ValueError(f'layout boxes must have shape (N, 5) as (class, x0, y0, x1, y1); got {boxes.shape}')
    boxes = boxes[~(boxes[:, 0] < 0)]  # NaN classes stay, and fail the class check below
    for row in boxes:
      label, x0, y0, x1, y1 = row
      if not (label == math.floor(label) and 0 <= label < self.num_classes):
        raise ValueError(f'layout box class {label:g} is not an integer in [0, {self.num_classes})')
      for name, value in zip(('x0', 'y0', 'x1', 'y1'), row[1:]):
        if not 0.0 <= value <= 1.0:
          raise ValueError(f'layout box {name}={value:g} of class {label:g} is outside [0, 1]')
      if not (x1 > x0 and y1 > y0):
        raise ValueError(f'layout box of class {label:g} is empty: it needs x0 < x1 and y0 < y1, '
                         f'got x0={x0:g}, x1={x1:g}, y0={y0:g}, y1={y1:g}')
    if len(boxes) > self.max_objects:
      logging.warning('LayoutTokenizer: %d boxes, more than max_objects=%d (cond_stage.'
                      'layout_max_objects): kept the first %d', len(boxes), self.max_objects,
                      self.max_objects)
      boxes = boxes[:self.max_objects]
    return boxes

  def encode(self, boxes) -> np.ndarray:
    """int32 (max_length,) tokens of one layout, boxes float (N, 5) (class, x0, y0, x1, y1)."""
    boxes = self._valid_boxes(boxes)
    tokens = np.full((self.max_objects, 3), self.pad_id, np.int32)
    tokens[:len(boxes), 0] = boxes[:, 0].astype(np.int32)
    tokens[:len(boxes), 1] = self.coordinate_token(boxes[:, 1], boxes[:, 2])
    tokens[:len(boxes), 2] = self.coordinate_token(boxes[:, 3], boxes[:, 4])
    tokens = tokens.reshape(-1)
    if self.encode_crop:
      tokens = np.concatenate([tokens, self.coordinate_token([0.0, 1.0], [0.0, 1.0])])
    return tokens

  def encode_batch(self, boxes) -> np.ndarray:
    """int32 (B, max_length) tokens of layouts boxes (B, N, 5)."""
    boxes = np.asarray(boxes)
    if boxes.ndim != 3:
      raise ValueError(f'layout boxes of a batch must have shape (B, N, 5); got {boxes.shape}')
    return np.stack([self.encode(row) for row in boxes]).reshape(len(boxes), self.max_length)

  def decode(self, tokens) -> np.ndarray:
    """float32 (max_objects, 5) boxes (class, x0, y0, x1, y1) of tokens (max_length,): the builder's
    inverse_build, corners on the grid (within half a grid step, 0.5 / (S-1), of the encoded ones);
    padding triples become rows of -1 (synthetic.BOX_PADDING) after the boxes."""
    tokens = np.asarray(tokens)
    if tokens.shape != (self.max_length,):
      raise ValueError(f'layout tokens must have shape ({self.max_length},); got {tokens.shape}')
    triples = tokens[:3 * self.max_objects].reshape(self.max_objects, 3)
    triples = triples[triples[:, 0] != self.pad_id]
    boxes = np.full((self.max_objects, 5), synthetic.BOX_PADDING, np.float32)
    x0, y0 = self.token_coordinates(triples[:, 1])
    x1, y1 = self.token_coordinates(triples[:, 2])
    boxes[:len(triples)] = np.stack([triples[:, 0], x0, y0, x1, y1], axis=-1)
    return boxes

  def null_tokens(self) -> np.ndarray:
    """int32 (max_length,): the layout without boxes (padding triples and the crop tokens)."""
    return self.encode(np.zeros((0, 5), np.float32))


def make_tokenizer(cond_stage, num_classes: int | None = None):
  """The tokenizer of `config.cond_stage` by its `key`: 'caption' (cond_stage.tokenizer 'wordpiece' or
  'word'), 'layout' (num_classes: object classes, synthetic.NUM_CLASSES unless given); None for
  other keys. Raises ConfigError when the tokens would not fit the TransformerEmbedder's
  vocab_size or max_seq_len."""
  key = cond_stage.key
  if key == 'caption':
    if cond_stage.tokenizer == 'wordpiece':
      tokenizer = WordPieceTokenizer(cond_stage.vocab_path, cond_stage.max_seq_len)
    elif cond_stage.tokenizer == 'word':
      tokenizer = WordTokenizer.for_synthetic_captions(cond_stage.max_seq_len)
    else:
      raise ConfigError(f"cond_stage.tokenizer: {cond_stage.tokenizer!r} is not one of 'wordpiece', 'word'")
    if tokenizer.vocab_size > cond_stage.vocab_size:
      raise ConfigError(f'cond_stage.vocab_size={cond_stage.vocab_size} is smaller than the '
                        f'{cond_stage.tokenizer} tokenizer\'s {tokenizer.vocab_size} tokens')
    return tokenizer
  if key == 'layout':
    tokenizer = LayoutTokenizer(cond_stage.vocab_size,
                                synthetic.NUM_CLASSES if num_classes is None else num_classes,
                                cond_stage.layout_max_objects, cond_stage.layout_encode_crop)
    if cond_stage.max_seq_len != tokenizer.max_length:
      crop = ' + 2 crop tokens' if tokenizer.encode_crop else ''
      raise ConfigError(
          f'cond_stage.max_seq_len={cond_stage.max_seq_len} but a layout has {tokenizer.max_length} '
          f'tokens (3 x cond_stage.layout_max_objects={tokenizer.max_objects}{crop}, '
          f'cond_stage.layout_encode_crop={tokenizer.encode_crop}): set max_seq_len to '
          f'{tokenizer.max_length}')
    return tokenizer
  return None
