"""Reconstruction quality of a stage-1 model on the eval split: PSNR, SSIM, LPIPS and, for VQ,
codebook perplexity and usage. Used for validation during stage-1 training and by
`--config.mode=eval_autoencoder`, which writes <workdir>/autoencoder/eval.json.

PSNR and SSIM are computed per image on [0, 1] pixels (reconstructions clipped to [-1, 1] first):
PSNR = 10 log10(1 / MSE), SSIM with an 11x11 Gaussian window, sigma 1.5 (dm_pix, as Wang et al.).
With eval.feature_network set, eval_autoencoder also gives rFID (or rFD-<dataset>): the Frechet distance
between the eval images and their reconstructions.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from latent_diffusion.data import pipeline
from latent_diffusion.errors import ConfigError
from latent_diffusion.evaluate.metrics import image_metrics
from latent_diffusion.models.quantize import count_indices
from latent_diffusion.train import common, loop, sharding


def has_eval_split(config) -> bool:
  source = config.data.source
  return (source == 'synthetic' or (source == 'folder' and bool(config.data.eval_path))
          or (source == 'tfds' and bool(config.data.tfds_eval_split)))


def eval_data_config(config):
  """config.data for the eval split: unflipped, center-cropped, in a fixed order."""
  if not has_eval_split(config):
    field = 'data.eval_path' if config.data.source == 'folder' else 'data.tfds_eval_split'
    raise ConfigError(f'{field}: not set; reconstruction metrics need a validation split')
  data_config = config.data.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.flip, data_config.crop = False, 'center'
    if data_config.source == 'folder':
      data_config.path = data_config.eval_path
    elif data_config.source == 'tfds':
      data_config.tfds_split = data_config.tfds_eval_split
    else:  # synthetic: examples the training seed never draws
      data_config.synthetic_seed += 1_000_003
  return data_config


class First:
  """The first `count` examples of a random-access source."""

  def __init__(self, source, count: int):
    self.source, self.count = source, min(count, len(source))

  def __len__(self):
    return self.count

  def __getitem__(self, index):
    if index >= self.count:
      raise IndexError(index)
    return self.source[index]


class Evaluator:
  """evaluator(autoencoder params) -> {'psnr', 'psnr_std', 'ssim', 'ssim_std', ['lpips', 'lpips_std'],
  ['perplexity', 'codes_used'], 'num_images'} over the first eval.num_images of the eval split.

  Every process reads its slice; batches are global arrays, so sums come back complete on every
  process. The last batch is padded and the padding masked out.
  """

  def __init__(self, config, model, perceptual=(None, None), mesh=None):
    self.config, self.model = config, model
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    self.lpips_fn, self.lpips_params = perceptual
    self.data_config = eval_data_config(config)
    source = self.split_source = pipeline.make_source(self.data_config)
    if config.eval.num_images:
      source = First(source, config.eval.num_images)
    self.source, self.num_images = source, len(source)
    self.local_batch = common.local_batch_size(config.eval.batch_size, self.mesh)
    self.num_batches = math.ceil(self.num_images / config.eval.batch_size)
    self.kind = config.autoencoder.kind
    self.num_codes = (count_indices(config.autoencoder.n_embed, config.autoencoder.remap or None,
                                    config.autoencoder.unknown_index) if self.kind == 'vq' else 0)
    batch_sharding = sharding.batch_sharding(self.mesh)
    self._batch_spec = batch_sharding.spec
    self._sums = jax.jit(self._batch_sums, out_shardings=(sharding.replicated(self.mesh), batch_sharding))

  def _batch_sums(self, params, lpips_params, images, mask):
    """(sums of the per-image metrics over the unmasked images, the reconstructions clipped to [-1, 1])."""
    if self.kind == 'vq':
      reconstructions, _, indices = self.model.apply({'params': params}, images)
    else:
      reconstructions = self.model.apply({'params': params}, images)[0]
    reconstructions = jnp.clip(reconstructions, -1.0, 1.0)
    psnr, ssim = image_metrics(images, reconstructions)
    per_image = {'psnr': psnr, 'ssim': ssim}
    if self.lpips_fn is not None:
      per_image['lpips'] = self.lpips_fn(lpips_params, images, reconstructions)
    sums = {'count': jnp.sum(mask)}
    for name, values in per_image.items():
      sums[name] = jnp.sum(values * mask)
      sums[f'{name}_squares'] = jnp.sum(jnp.square(values) * mask)
    if self.kind == 'vq':
      weights = jnp.broadcast_to(mask[:, None, None], indices.shape).reshape(-1)
      sums['code_counts'] = jnp.zeros((self.num_codes,), jnp.float32).at[indices.reshape(-1)].add(weights)
    return sums, reconstructions

  def _local_batches(self):
    iterator = pipeline.make_iterator(self.data_config, batch_size=self.local_batch, seed=0, shuffle=False,
                                      num_epochs=1, drop_remainder=False, source=self.source)
    for _ in range(self.num_batches):
      batch = next(iterator, None)
      images = np.zeros((0,) + self._image_shape(), np.float32) if batch is None else batch['image']
      count = len(images)
      padded = np.zeros((self.local_batch,) + images.shape[1:], np.float32)
      padded[:count] = images
      mask = np.zeros((self.local_batch,), np.float32)
      mask[:count] = 1.0
      yield padded, mask

  def _image_shape(self):
    size = self.data_config.image_size
    return (size, size, self.config.autoencoder.in_channels)

  def __call__(self, params, feature_network=None) -> dict:
    """The metrics above; with a feature network (evaluate/features.py) also {'rFID' or 'rFD-<dataset>',
    'feature_network'} from the same reconstructions, so each eval image goes through the model once."""
    totals, real_features, fake_features = None, [], []
    for images, mask in self._local_batches():
      batch = sharding.global_batch({'image': images, 'mask': mask}, self.mesh)
      sums, reconstructions = self._sums(params, self.lpips_params, batch['image'], batch['mask'])
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      if feature_network is not None:
        count = int(mask.sum())
        real_features.append(feature_network.extract(images[:count])[0])
        local = multihost_utils.global_array_to_host_local_array(reconstructions, self.mesh, self._batch_spec)
        fake_features.append(feature_network.extract(np.asarray(local)[:count])[0])
    totals = jax.device_get(totals)
    count = float(totals.pop('count'))
    results = {'num_images': int(count)}
    for name in ('psnr', 'ssim', 'lpips'):
      if name in totals:
        mean = float(totals[name]) / count
        results[name] = mean
        results[f'{name}_std'] = math.sqrt(max(float(totals[f'{name}_squares']) / count - mean ** 2, 0.0))
    if 'code_counts' in totals:
      probs = np.asarray(totals['code_counts'], np.float64) / max(float(np.sum(totals['code_counts'])), 1.0)
      results['perplexity'] = float(np.exp(-np.sum(probs * np.log(probs + 1e-10))))
      results['codes_used'] = int(np.sum(probs > 0))
    if feature_network is not None:
      results.update(reconstruction_distance(real_features, fake_features, feature_network))
    return results


def reconstruction_distance(real_features, fake_features, network) -> dict:
  """{'rFID' or 'rFD-<dataset>': the Frechet distance between the eval images' features and their
  reconstructions' (the paper's Table 8), 'feature_network'}; each list holds this process's batches."""
  from latent_diffusion.evaluate import metrics  # pylint: disable=g-import-not-at-top
  real, fake = (np.asarray(multihost_utils.process_allgather(np.concatenate(f), tiled=True))
                for f in (real_features, fake_features))
  distance = metrics.frechet_distance(*metrics.feature_statistics(real, 'eval images'),
                                      *metrics.feature_statistics(fake, 'reconstructions'))
  return {f'r{network.distance_name}': distance, 'feature_network': network.name}


def describe(results: dict) -> str:
  return '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in sorted(results.items()))


def evaluate_autoencoder(config, workdir) -> dict:
  """eval_autoencoder mode: reconstruct the eval split with the latest stage-1 checkpoint and write
  PSNR / SSIM / LPIPS (LPIPS when the VGG16 weights are configured) to autoencoder/eval.json."""
  from latent_diffusion.train import autoencoder as stage1  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  model, params = stage1.load_params(config, workdir, mesh)
  perceptual = (None, None)
  if config.autoencoder_loss.lpips_vgg_path:
    perceptual = stage1.make_perceptual(config, required=True)
  else:
    logging.info('eval_autoencoder: LPIPS skipped (autoencoder_loss.lpips_vgg_path is not set)')
  network = None
  if config.eval.feature_network:
    from latent_diffusion.evaluate import features  # pylint: disable=g-import-not-at-top
    network = features.make_feature_network(config)
  evaluator = Evaluator(config, model, perceptual, mesh)
  results = evaluator(params, network)
  results['step'] = common.latest_step(workdir, stage1.STAGE)
  results['split'] = pipeline.describe(evaluator.data_config, evaluator.split_source)
  path = common.stage_dir(workdir, stage1.STAGE) / 'eval.json'
  loop.save_json(path, results)
  logging.info('eval_autoencoder: %s; wrote %s', describe(results), path)
  return results
