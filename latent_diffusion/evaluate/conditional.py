"""eval_conditional mode: whether a conditional model's samples obey their conditions.

One sample per condition, for eval.num_images conditions (class labels cycle through the classes;
the others are those of the held-out data: the synthetic set's unseen seeds, data.eval_path), drawn
with config.sample's sampler and guidance scale, then measured:

  label         class accuracy: samples the classifier of eval.classifier_path assigns the requested class
  caption       text adherence: samples whose objects have the prompted shapes and colours (and relations),
                read by the shapes parser of eval.parser_path
  layout        layout adherence: IoU of the detected objects' boxes with the requested boxes
  segmentation  semantic pixel accuracy of the parsed map against the requested map
  low_res       PSNR / SSIM (and LPIPS with VGG16 weights) against the truth, beside bicubic upsampling
  masked_image  PSNR of the masked region against the truth, beside skimage's inpaint_biharmonic

For super-resolution and inpainting, eval.samples_per_condition = K > 1 draws K samples per condition
(seeds sample.seed .. sample.seed + K - 1) and also measures their pixel mean ('ldm_mean_of_K'): an
estimate of the posterior mean, the estimate that PSNR rewards. The 'ldm' entry is always the first
sample alone, as with K = 1.

Writes <workdir>/diffusion/eval_<key>_<sampler tag>.json and a grid of the first samples.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from latent_diffusion import sample as sample_mode
from latent_diffusion import sample_inputs
from latent_diffusion.errors import ConfigError
from latent_diffusion.evaluate import adherence
from latent_diffusion.evaluate.metrics import image_metrics
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, conditioning, diffusion, sharding

GRID_SAMPLES = 16


def masked_psnr(images, truth, mask) -> np.ndarray:
  """Per-image PSNR (dB) over the masked pixels of [-1, 1] images (N, H, W, 3); mask (N, H, W, 1)."""
  x, y = (np.asarray(images) + 1) / 2, (np.asarray(truth) + 1) / 2
  weight = np.broadcast_to(np.asarray(mask), x.shape)
  mse = (weight * (x - y) ** 2).sum(axis=(1, 2, 3)) / np.maximum(weight.sum(axis=(1, 2, 3)), 1)
  return 10 * np.log10(1 / np.maximum(mse, 1e-10))


def bicubic_upsample(low_res, size: tuple[int, int]) -> np.ndarray:
  """[-1, 1] images (N, h, w, 3) upsampled by PIL bicubic to size (H, W): the SR baseline."""
  upsampled = [np.asarray(Image.fromarray(np.asarray((image + 1) * 127.5 + 0.5, np.float32).clip(0, 255)
                                          .astype(np.uint8)).resize(size[::-1], Image.Resampling.BICUBIC))
               for image in np.asarray(low_res)]
  return np.stack(upsampled).astype(np.float32) / 127.5 - 1


def biharmonic_inpaint(images, masks) -> np.ndarray:
  """The non-learned inpainting baseline: skimage.restoration.inpaint_biharmonic of each image."""
  from skimage.restoration import inpaint_biharmonic  # pylint: disable=g-import-not-at-top
  filled = [inpaint_biharmonic((image + 1) / 2, mask[..., 0] > 0.5, channel_axis=-1)
            for image, mask in zip(np.asarray(images), np.asarray(masks))]
  return np.stack(filled).astype(np.float32) * 2 - 1


def _summary(values) -> dict:
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'std': float(values.std())}


def _parsed(config, samples):
  from latent_diffusion.evaluate import shapes_parser  # pylint: disable=g-import-not-at-top
  if not config.eval.parser_path:
    raise ConfigError('eval.parser_path: give the shapes parser (python -m latent_diffusion.evaluate.shapes_parser '
                      '--out=PATH trains one)')
  return shapes_parser.parse(shapes_parser.load_parser(config.eval.parser_path), samples)


def measure(config, key: str, samples: np.ndarray, batch: dict) -> dict:
  """The adherence measures of `key` for samples drawn under the conditions in `batch`."""
  if key == 'label':
    from latent_diffusion.evaluate import classifier  # pylint: disable=g-import-not-at-top
    if not config.eval.classifier_path:
      raise ConfigError('eval.classifier_path: give a classifier of the data set (python -m '
                        'latent_diffusion.evaluate.classifier --data=... --out=PATH trains one)')
    predicted = classifier.predict(classifier.load_classifier(config.eval.classifier_path), samples)
    per_class = {int(c): adherence.class_accuracy(predicted[batch['label'] == c], batch['label'][batch['label'] == c])
                 for c in np.unique(batch['label'])}
    return {'class_accuracy': adherence.class_accuracy(predicted, batch['label']),
            'class_accuracy_per_class': per_class}
  if key in ('caption', 'layout', 'segmentation'):
    shape_maps, colour_maps = _parsed(config, samples)
    # Each measure also against the next sample's condition: the score of a model that ignores it.
    if key == 'caption':
      captions = [str(c) for c in batch['caption']]
      detected = adherence.detect_objects(shape_maps, colour_maps)
      return {'text_adherence': adherence.text_adherence(shape_maps, colour_maps, captions, detected),
              'text_adherence_wrong_captions': adherence.text_adherence(
                  shape_maps, colour_maps, captions[1:] + captions[:1], detected)}
    if key == 'layout':
      detected = adherence.detect_objects(shape_maps, colour_maps)
      return {'layout_iou': adherence.layout_adherence(shape_maps, colour_maps, batch['boxes'], detected),
              'layout_iou_wrong_boxes': adherence.layout_adherence(
                  shape_maps, colour_maps, np.roll(batch['boxes'], -1, axis=0), detected)}
    return {'semantic_pixel_accuracy': adherence.semantic_accuracy(shape_maps, batch['segmentation']),
            'semantic_pixel_accuracy_wrong_maps': adherence.semantic_accuracy(
                shape_maps, np.roll(batch['segmentation'], -1, axis=0))}
  truth = batch['image']
  if key == 'low_res':
    bicubic = bicubic_upsample(batch['low_res'], truth.shape[1:3])
    results = {name: restoration_scores(key, images, batch)
               for name, images in (('ldm', samples), ('bicubic', bicubic))}
    lpips = _lpips(config, truth, {'ldm': samples, 'bicubic': bicubic})
    for name, value in lpips.items():
      results[name]['lpips'] = value
    if not lpips:
      results['lpips'] = ('not measured: needs autoencoder_loss.lpips_vgg_path and lpips_heads_path '
                          '(VGG16 and LPIPS weights)')
    return results
  if key == 'masked_image':
    baseline = biharmonic_inpaint(truth, batch['mask'])
    return {'ldm': restoration_scores(key, samples, batch),
            'biharmonic': restoration_scores(key, baseline, batch),
            'mask_coverage': float(np.mean(batch['mask']))}
  raise ConfigError(f'eval_conditional: cond_stage.key {key!r} has no adherence measure')


def restoration_scores(key: str, images: np.ndarray, batch: dict) -> dict:
  """PSNR and SSIM (super-resolution) or masked-region PSNR (inpainting) of images against batch['image']."""
  truth = batch['image']
  if key == 'low_res':
    psnr, ssim = (np.asarray(v) for v in image_metrics(jnp.asarray(truth), jnp.asarray(images)))
    return {'psnr': _summary(psnr), 'ssim': _summary(ssim)}
  return {'masked_psnr': _summary(masked_psnr(images, truth, batch['mask']))}


def _lpips(config, truth, candidates: dict) -> dict:
  if not config.autoencoder_loss.lpips_vgg_path:
    return {}
  lpips_fn, lpips_params = stage1.make_perceptual(config, required=True)
  return {name: _summary(np.asarray(lpips_fn(lpips_params, jnp.asarray(truth), jnp.asarray(images))))
          for name, images in candidates.items()}


def conditions(config, count: int, tokenizer) -> tuple[dict, dict, str | None]:
  """(sampler inputs, condition batch, where the examples come from) of the evaluation: labels cycling
  over the classes (from nowhere: None), or the first `count` held-out examples."""
  key = conditioning.condition_key(config)
  if key == 'label':
    labels = np.arange(count, dtype=np.int32) % config.data.num_classes
    return {'label': labels}, {'label': labels}, None
  batch, conditions_from = sample_inputs.held_out_batch(config, count)
  return conditioning.sampler_inputs(config, batch, tokenizer), batch, conditions_from


def result_name(config) -> str:
  """eval_conditional's file name (without .json / .png) for this config's condition and sampler."""
  return f'eval_{conditioning.condition_key(config)}_{diffusion.sampler_tag(config)}'


def evaluate_conditional(config, workdir) -> dict:
  key = conditioning.condition_key(config)
  if not key:
    raise ConfigError('eval_conditional: the model is unconditional (diffusion.conditioning_key is empty)')
  count = config.eval.num_images
  repeats = config.eval.samples_per_condition
  if repeats < 1 or (repeats > 1 and key not in conditioning.RESTORATION_KEYS):
    raise ConfigError(f'eval.samples_per_condition is {repeats}: it must be >= 1, and can be more than 1 only for '
                      f'super-resolution and inpainting (cond_stage.key low_res or masked_image), not {key!r}')
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  model, params, scale_factor, step = sample_mode.restore_denoiser(config, workdir, mesh)
  tokenizer = diffusion.make_tokenizer(config)
  inputs, batch, conditions_from = conditions(config, count, tokenizer)
  sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config),
                                   tokenizer=tokenizer)
  start = time.time()
  draws = [sample_inputs.composite(config, sample_mode.draw_samples(
      config, sampler, params, ae_params, scale_factor, inputs, count, config.sample.seed + index), batch)
           for index in range(repeats)]
  seconds = time.time() - start
  samples = draws[0]
  results = {'task': key, 'step': int(step), 'num_samples': count, 'samples_per_condition': repeats,
             **({'conditions_from': conditions_from} if conditions_from else {}),
             'sampler': diffusion.sampler_tag(config),
             'guidance_scale': config.sample.guidance_scale, 'sampling_seconds': round(seconds, 1),
             **measure(config, key, samples, batch)}
  if repeats > 1:
    results[f'ldm_mean_of_{repeats}'] = restoration_scores(key, np.mean(draws, axis=0), batch)
  directory = common.stage_dir(workdir, diffusion.STAGE)
  name = result_name(config)
  if jax.process_index() == 0:
    (directory / f'{name}.json').write_text(json.dumps(results, indent=2) + '\n')
    display = {field: value[:GRID_SAMPLES] for field, value in batch.items()}
    sample_inputs.save_grid(config, directory / 'samples' / f'{name}.png', samples[:GRID_SAMPLES], display)
  logging.info('eval_conditional: %s', json.dumps(results))
  print(json.dumps(results, indent=2))
  return results
