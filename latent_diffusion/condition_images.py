"""Conditions drawn as images, beside the samples that obey them: a caption as text, boxes outlined
and named, a semantic map in a palette, a low-resolution input upscaled, the masked input of
inpainting, a class name.

Every panel is uint8 (side, side, 3); `conditional_grid` lays out [condition | sample] pairs (or
[condition | start image | sample] for img2img).
"""

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from latent_diffusion import images as image_io

MIN_SIDE = 128  # panels and samples are shown at least this large, so a caption stays legible
# A fixed palette for boxes and semantic classes (class 0 of a map, the background, is white).
PALETTE = np.array([(255, 255, 255), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190),
                    (0, 128, 128), (170, 110, 40), (128, 0, 0), (128, 128, 0), (0, 0, 128),
                    (128, 128, 128)], np.uint8)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one bitmap size
    return ImageFont.load_default()


def _blank(height: int, width: int) -> Image.Image:
  return Image.new('RGB', (width, height), (255, 255, 255))


def caption_panel(text: str, height: int, width: int) -> np.ndarray:
  """The caption as wrapped black text on white."""
  image = _blank(height, width)
  draw = ImageDraw.Draw(image)
  size = max(9, width // 12)
  lines = textwrap.wrap(text, width=max(8, int(width / (0.55 * size)))) or ['(empty)']
  draw.multiline_text((4, 4), '\n'.join(lines), fill=(0, 0, 0), font=_font(size), spacing=2)
  return np.asarray(image)


def boxes_panel(boxes: np.ndarray, height: int, width: int, class_names=()) -> np.ndarray:
  """Boxes (N, 5) rows (class, x0, y0, x1, y1) in [0, 1] (class < 0: none), outlined and named."""
  image = _blank(height, width)
  draw = ImageDraw.Draw(image)
  font = _font(max(9, width // 14))
  for row in np.asarray(boxes):
    kind = int(row[0])
    if kind < 0:
      continue
    colour = tuple(int(c) for c in PALETTE[1 + kind % (len(PALETTE) - 1)])
    x0, y0, x1, y1 = row[1] * width, row[2] * height, row[3] * width, row[4] * height
    draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=2)
    name = class_names[kind] if kind < len(class_names) else str(kind)
    draw.text((x0 + 3, y0 + 2), name, fill=colour, font=font)
  return np.asarray(image)


def segmentation_panel(segmentation: np.ndarray, height: int, width: int) -> np.ndarray:
  """A map of class indices (S, S) in the palette, resized (nearest) to height x width."""
  colours = PALETTE[np.asarray(segmentation) % len(PALETTE)]
  return np.asarray(Image.fromarray(colours).resize((width, height), Image.Resampling.NEAREST))


def image_panel(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """A [-1, 1] image (h, w, 3) shown at height x width (nearest, so low-resolution pixels show)."""
  return np.asarray(Image.fromarray(image_io.to_uint8(image)).resize((width, height), Image.Resampling.NEAREST))


def masked_panel(image: np.ndarray, mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """The inpainting input: the image with its masked region (mask (S, S, 1), 1 = to fill) grey."""
  shown = np.where(np.asarray(mask) > 0.5, 0.0, np.asarray(image))
  return image_panel(shown, height, width)


def label_panel(label: int, height: int, width: int, class_names=()) -> np.ndarray:
  name = class_names[label] if 0 <= label < len(class_names) else f'class {label}'
  return caption_panel(name, height, width)


def condition_panels(key: str, display: dict, count: int, height: int, width: int,
                     class_names=()) -> np.ndarray:
  """(count, height, width, 3) uint8: panel i shows the condition of sample i (`key` as cond_stage.key;
  `display` holds the batch fields: label, caption, boxes, segmentation, low_res, image + mask)."""
  panels = []
  for i in range(count):
    if key == 'caption':
      panels.append(caption_panel(str(display['caption'][i]), height, width))
    elif key == 'layout':
      panels.append(boxes_panel(display['boxes'][i], height, width, class_names))
    elif key == 'segmentation':
      panels.append(segmentation_panel(display['segmentation'][i], height, width))
    elif key == 'low_res':
      panels.append(image_panel(display['low_res'][i], height, width))
    elif key == 'masked_image':
      panels.append(masked_panel(display['image'][i], display['mask'][i], height, width))
    else:
      panels.append(label_panel(int(display['label'][i]), height, width, class_names))
  return np.stack(panels)


def conditional_grid(samples: np.ndarray, panels: list[np.ndarray],
                     pairs_per_row: int | None = None) -> np.ndarray:
  """uint8 grid of [panels | sample] groups (samples [-1, 1] (N, H, W, 3)); `panels` holds (N, h, w, 3)
  uint8 stacks shown left to right before each sample (e.g. the condition, then img2img's start image);
  plain samples without panels. Samples smaller than the panels are enlarged (nearest) to their size."""
  shown = image_io.to_uint8(samples)
  if not panels:
    return image_io.make_grid(shown)
  height, width = panels[0].shape[1:3]
  if shown.shape[1:3] != (height, width):
    shown = np.stack([np.asarray(Image.fromarray(s).resize((width, height), Image.Resampling.NEAREST))
                      for s in shown])
  groups = np.stack([*panels, shown], axis=1).reshape((-1,) + panels[0].shape[1:])
  columns = (len(panels) + 1) * (pairs_per_row or max(1, int(np.ceil(np.sqrt(len(samples))))))
  return image_io.make_grid(groups, columns)


def display_size(height: int, width: int) -> tuple[int, int]:
  """The side lengths panels and samples are shown at: at least MIN_SIDE, aspect kept."""
  scale = max(1, int(np.ceil(MIN_SIDE / max(min(height, width), 1))))
  return height * scale, width * scale
