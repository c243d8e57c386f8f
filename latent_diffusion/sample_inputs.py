"""The conditions of a sample grid: from the command line (sample.prompt, class_label, layout,
segmentation, image, mask) or, without those and for the grids written during training, from the
held-out data (the synthetic set's unseen seeds, data.eval_path, ...), so that every sample can be
checked against the condition it was given. Also img2img's start image (sample.init_image).

`grid_inputs` returns (inputs, display): `inputs` are the host inputs the sampler reads
(train/conditioning.host_inputs), `display` the condition as data fields (caption, boxes,
segmentation, low_res, image + mask, label) for drawing and for measuring adherence.
"""

import json
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from latent_diffusion import condition_images
from latent_diffusion import images as image_io
from latent_diffusion.data import pipeline, synthetic
from latent_diffusion.errors import ConfigError, DataError
from latent_diffusion.models import autoencoder as autoencoder_model
from latent_diffusion.train import conditioning


def class_names(config) -> tuple[str, ...]:
  if config.data.source == 'synthetic':
    return synthetic.SHAPES
  return ()


def _cycle(values: np.ndarray, count: int) -> np.ndarray:
  return values[np.arange(count) % len(values)]


def _read_png(path: str, field: str, mode: str) -> np.ndarray:
  if not Path(path).is_file():
    raise ConfigError(f'{field}: no such file {path!r}')
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert(mode) if mode != 'index' else image)
  except (UnidentifiedImageError, OSError) as e:
    raise DataError(f'{field}: {path!r} is not a readable image ({e})') from e


def read_image(path: str, field: str) -> np.ndarray:
  """An RGB PNG/JPEG as float32 (H, W, 3) in [-1, 1]."""
  return _read_png(path, field, 'RGB').astype(np.float32) / 127.5 - 1.0


def read_mask(path: str, field: str) -> np.ndarray:
  """A mask image as float32 (H, W, 1): 1 where the image is to be filled (white, > 127)."""
  return (_read_png(path, field, 'L') > 127).astype(np.float32)[..., None]


def read_segmentation(path: str, num_labels: int) -> np.ndarray:
  """A PNG of class indices (palette or greyscale) as int32 (H, W); labels must be < num_labels."""
  array = _read_png(path, 'sample.segmentation', 'index')
  if array.ndim == 3:
    raise DataError(f'sample.segmentation: {path!r} holds colours {array.shape}; give one class index per '
                    'pixel (a greyscale or palette PNG)')
  array = array.astype(np.int32)
  unknown = np.unique(array[(array < 0) | (array >= num_labels)])
  if unknown.size:
    raise DataError(f'sample.segmentation: {path!r} has labels {unknown.tolist()[:10]} outside the model\'s '
                    f'[0, {num_labels - 1}] (cond_stage.in_channels={num_labels})')
  return array


def read_layout(path: str, num_classes: int, names=()) -> np.ndarray:
  """A JSON list of boxes [{"class": k or name, "box": [x0, y0, x1, y1]}, ...] (coordinates in [0, 1]
  of the image side) as float32 (N, 5) rows (class, x0, y0, x1, y1)."""
  if not Path(path).is_file():
    raise ConfigError(f'sample.layout: no such file {path!r}')
  try:
    entries = json.loads(Path(path).read_text())
  except json.JSONDecodeError as e:
    raise DataError(f'sample.layout: {path!r} is not valid JSON ({e})') from e
  if not isinstance(entries, list) or not entries:
    raise DataError(f'sample.layout: {path!r} must hold a non-empty list of boxes')
  rows = []
  for index, entry in enumerate(entries):
    if not isinstance(entry, dict) or 'class' not in entry or 'box' not in entry:
      raise DataError(f'sample.layout: box {index} of {path!r} needs "class" and "box", got {entry!r}')
    kind = entry['class']
    if isinstance(kind, str):
      if kind not in names:
        raise DataError(f'sample.layout: box {index}: unknown class {kind!r}; known: {", ".join(names)}')
      kind = names.index(kind)
    if not 0 <= int(kind) < num_classes:
      raise DataError(f'sample.layout: box {index}: class {kind} is outside [0, {num_classes - 1}]')
    box = [float(v) for v in entry['box']]
    if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box):
      raise DataError(f'sample.layout: box {index}: {entry["box"]} must be 4 coordinates in [0, 1]')
    if box[2] <= box[0] or box[3] <= box[1]:
      raise DataError(f'sample.layout: box {index}: {entry["box"]} needs x1 > x0 and y1 > y0')
    rows.append([int(kind)] + box)
  return np.asarray(rows, np.float32)


def _cli_display(config, key: str, count: int) -> dict | None:
  """The condition given on the command line, or None when none is given."""
  s = config.sample
  if key == 'label':
    if s.class_label < 0:
      return None
    if s.class_label >= max(config.data.num_classes, 1):
      raise ConfigError(f'sample.class_label={s.class_label} is outside [0, {config.data.num_classes - 1}] '
                        f'(data.num_classes={config.data.num_classes})')
    return {'label': np.full((count,), s.class_label, np.int32)}
  if key == 'caption' and s.prompt:
    prompts = np.asarray([p.strip() for p in s.prompt.split('|')])
    return {'caption': _cycle(prompts, count)}
  if key == 'layout' and s.layout:
    boxes = read_layout(s.layout, synthetic.NUM_CLASSES, synthetic.SHAPES)
    return {'boxes': np.broadcast_to(boxes, (count,) + boxes.shape).copy()}
  if key == 'segmentation' and s.segmentation:
    segmentation = read_segmentation(s.segmentation, config.cond_stage.in_channels)
    return {'segmentation': np.broadcast_to(segmentation, (count,) + segmentation.shape).copy()}
  if key == 'low_res' and s.image:
    low_res = read_image(s.image, 'sample.image')
    return {'low_res': np.broadcast_to(low_res, (count,) + low_res.shape).copy()}
  if key == 'masked_image' and (s.image or s.mask):
    if not (s.image and s.mask):
      raise ConfigError('inpainting needs both sample.image and sample.mask')
    image, mask = read_image(s.image, 'sample.image'), read_mask(s.mask, 'sample.mask')
    if image.shape[:2] != mask.shape[:2]:
      raise DataError(f'sample.mask: its size {mask.shape[1]}x{mask.shape[0]} does not match sample.image\'s '
                      f'{image.shape[1]}x{image.shape[0]}')
    return {'image': np.broadcast_to(image, (count,) + image.shape).copy(),
            'mask': np.broadcast_to(mask, (count,) + mask.shape).copy()}
  return None


def read_init_image(config, count: int) -> np.ndarray | None:
  """img2img's start image (sample.init_image) for each of `count` samples (count, H, W, 3) in [-1, 1],
  or None without one."""
  if not config.sample.init_image:
    return None
  image = read_image(config.sample.init_image, 'sample.init_image')
  return np.broadcast_to(image, (count,) + image.shape).copy()


def held_out_data_config(config):
  """config.data of the held-out examples: the eval split where there is one, else the training data;
  unflipped and read in the main process."""
  from latent_diffusion import evaluate  # pylint: disable=g-import-not-at-top
  data_config = (evaluate.eval_data_config(config) if evaluate.has_eval_split(config)
                 else config.data.copy_and_resolve_references())
  with data_config.unlocked():
    data_config.flip, data_config.worker_count = False, 0
  return data_config


def held_out_batch(config, count: int) -> tuple[dict, str]:
  """(the first `count` held-out examples as one batch, where they come from: pipeline.describe). The
  batch is in a fixed order, unflipped, with the low-resolution inputs and masks the data config makes."""
  data_config = held_out_data_config(config)
  source = pipeline.make_source(data_config)
  iterator = pipeline.make_iterator(data_config, batch_size=count, seed=config.seed, shuffle=False,
                                    process_index=0, process_count=1, drop_remainder=False, source=source)
  batch = next(iterator)
  if len(batch['image']) < count:
    raise DataError(f'the held-out data has {len(batch["image"])} examples; the grid needs {count}')
  return batch, pipeline.describe(data_config, source)


def pixel_size(config, key: str, display: dict) -> tuple[int, int]:
  """(height, width) of the samples: sample.height/width, else the size the inputs imply (a
  segmentation map, an inpainting image or img2img's start image sets it, a low-resolution image times
  the factor f), else data.image_size."""
  f = autoencoder_model.factor_of(config.autoencoder)
  fixed = key in ('segmentation', 'masked_image') or 'init_image' in display
  if key == 'segmentation':
    implied = display['segmentation'].shape[1:3]
  elif key == 'masked_image':
    implied = display['image'].shape[1:3]
  elif key == 'low_res':
    scale = config.data.image_size // max(config.data.low_res_size, 1)
    implied = tuple(side * scale for side in display['low_res'].shape[1:3])
  elif 'init_image' in display:
    implied = display['init_image'].shape[1:3]
  else:
    implied = (config.data.image_size, config.data.image_size)
  if 'init_image' in display and tuple(display['init_image'].shape[1:3]) != tuple(implied):
    start = display['init_image'].shape[1:3]
    raise ConfigError(f'sample.init_image: its size {start[1]}x{start[0]} does not match the '
                      f'{implied[1]}x{implied[0]} samples the condition ({key}) implies')
  height, width = config.sample.height or implied[0], config.sample.width or implied[1]
  if fixed and (height, width) != tuple(implied):
    source = 'sample.init_image' if 'init_image' in display else 'the condition'
    raise ConfigError(f'sample.height x width = {height}x{width} does not match {source}\'s '
                      f'{implied[0]}x{implied[1]}')
  if height % f or width % f:
    raise ConfigError(f'sample size {height}x{width} must be divisible by the autoencoder factor f={f}')
  return height, width


def grid_inputs(config, count: int, tokenizer=None, from_cli: bool = True) -> tuple[dict, dict]:
  """(sampler inputs, display fields) of `count` samples; see the module docstring."""
  key = conditioning.condition_key(config)
  if not key:
    return {}, {}
  display = _cli_display(config, key, count) if from_cli else None
  if display is None:
    if key == 'label':
      display = {'label': np.asarray(conditioning.sampling_labels(config, count))}
    else:
      display, described = held_out_batch(config, count)
      logging.info('sample: conditions of %d held-out examples of %s (no sample.* input given)', count,
                   described)
  inputs = conditioning.sampler_inputs(config, display, tokenizer)
  return inputs, {name: display[name] for name in display
                  if name in conditioning.BATCH_FIELDS[key] + ('caption', 'boxes', 'label')}


def composite(config, samples: np.ndarray, display: dict) -> np.ndarray:
  """Inpainting keeps the known pixels: (1 - mask) * image + mask * sample (the paper's inpaint.py)."""
  if conditioning.condition_key(config) != 'masked_image':
    return samples
  mask = display['mask'][:len(samples)]
  return (1.0 - mask) * display['image'][:len(samples)] + mask * samples


def save_grid(config, path, samples: np.ndarray, display: dict) -> Path:
  """Write the [condition | sample] grid as one PNG: [condition | start image | sample] for img2img,
  [start image | sample] for an unconditional img2img, plain samples for unconditional models."""
  key = conditioning.condition_key(config)
  height, width = condition_images.display_size(*samples.shape[1:3])
  panels = []
  if key:
    panels.append(condition_images.condition_panels(key, display, len(samples), height, width,
                                                    class_names(config)))
  if 'init_image' in display:
    panels.append(np.stack([condition_images.image_panel(image, height, width)
                            for image in display['init_image'][:len(samples)]]))
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(condition_images.conditional_grid(samples, panels)).save(path)
  return path


def save_individual(directory, samples: np.ndarray) -> list[Path]:
  """Each sample as its own PNG, 000000.png, 000001.png, ..."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for index, image in enumerate(image_io.to_uint8(samples)):
    paths.append(directory / f'{index:06d}.png')
    Image.fromarray(image).save(paths[-1])
  return paths
