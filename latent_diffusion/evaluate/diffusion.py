"""eval_diffusion mode: draw eval.num_samples samples of the latest stage-2 checkpoint and measure them
against real images with a feature network (evaluate/features.py): FID or FD-<dataset>, IS, KID,
precision and recall, written to <workdir>/diffusion/eval.json (and eval_<sampler>_n<N>_step<step>.json).

Sampling at scale: batches of sample.batch_size, split over every device of the mesh, each written as
soon as it is drawn (an .npz shard of uint8 images, or one PNG per sample) under
<workdir>/diffusion/eval_samples/step<step>_<sampler>_seed<seed>/. Batch k is drawn from the key
fold_in(seed, k), so an interrupted run, started again, skips the batches already written and ends
with the same samples as an uninterrupted one. On several hosts, process 0 writes the samples, decides
which batches are left and measures them.
"""

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from latent_diffusion import images as image_io
from latent_diffusion import sample as sample_mode
from latent_diffusion.errors import ConfigError
from latent_diffusion.evaluate import conditional, features
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, conditioning, diffusion, loop, sharding



class SampleStore:
  """Batches of uint8 samples (B, H, W, 3) on disk, by batch index; a batch counts as written only
  once all of it is (files are written under a temporary name, then renamed)."""

  def __init__(self, directory: Path, sample_format: str, batch_size: int, count: int):
    self.directory, self.format, self.batch_size, self.count = directory, sample_format, batch_size, count
    self.num_batches = -(-count // batch_size)

  def indices(self, index: int) -> range:
    return range(index * self.batch_size, min((index + 1) * self.batch_size, self.count))

  def _shard(self, index: int) -> Path:
    return self.directory / f'batch_{index:06d}.npz'

  def _png(self, sample: int) -> Path:
    return self.directory / f'{sample:06d}.png'

  def is_written(self, index: int) -> bool:
    if self.format == 'npz':
      return self._shard(index).is_file()
    return all(self._png(i).is_file() for i in self.indices(index))

  def write(self, index: int, images: np.ndarray) -> None:
    """images uint8 (B, H, W, 3); only the first count - index * batch_size are kept."""
    self.directory.mkdir(parents=True, exist_ok=True)
    images = images[:len(self.indices(index))]
    if self.format == 'npz':
      partial = self.directory / f'batch_{index:06d}.partial.npz'
      np.savez(partial, images=images)
      partial.replace(self._shard(index))
      return
    for sample, image in zip(self.indices(index), images):
      partial = self.directory / f'{sample:06d}.partial.png'
      Image.fromarray(image).save(partial)
      partial.replace(self._png(sample))

  def read(self, index: int) -> np.ndarray:
    if self.format == 'npz':
      with np.load(self._shard(index)) as data:
        return data['images']
    return np.stack([np.asarray(Image.open(self._png(i)).convert('RGB')) for i in self.indices(index)])

  def batches(self):
    """The stored samples in order, as float32 batches in [-1, 1]."""
    for index in range(self.num_batches):
      yield self.read(index).astype(np.float32) / 127.5 - 1.0


def sample_inputs(config, count: int, tokenizer) -> dict:
  """The host inputs of `count` samples' conditions: class labels cycling over the classes, held-out
  conditions for other conditional models, none for unconditional ones."""
  if not conditioning.is_conditional(config):
    return {}
  return conditional.conditions(config, count, tokenizer)[0]


def draw_to_store(config, store: SampleStore, sampler, params, ae_params, scale_factor, inputs: dict,
                  mesh, progress: bool = True) -> dict:
  """Draws every batch not yet in `store`; {'drawn', 'skipped', 'seconds', 'first_batch_seconds' (with
  the sampler's compilation), 'images_per_second' (after the first batch; None with one batch)}."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  batch_size, rng = store.batch_size, jax.random.PRNGKey(config.sample.seed)
  # Process 0 writes the samples and decides what is left: other hosts may not see its disk.
  written = np.asarray(multihost_utils.broadcast_one_to_all(
      np.asarray([store.is_written(index) for index in range(store.num_batches)], np.bool_)))
  pending = [index for index in range(store.num_batches) if not written[index]]
  already = store.count - sum(len(store.indices(index)) for index in pending)
  bar = tqdm(total=store.count, initial=already, unit='img', desc='eval_diffusion',
             disable=not progress or jax.process_index() != 0)
  drawn, start, first_batch_seconds, after_first = 0, time.time(), None, 0
  for index in pending:
    batch_inputs = sample_mode.batch_of_inputs(inputs, index * batch_size, batch_size)
    images = sampler(params, ae_params, scale_factor, jax.random.fold_in(rng, index),
                     jax.device_put(batch_inputs, sharding.batch_sharding(mesh)),  # the same on every process
                     num_samples=batch_size, num_steps=config.sample.num_steps)
    images = multihost_utils.process_allgather(images, tiled=True)
    if jax.process_index() == 0:
      store.write(index, image_io.to_uint8(np.asarray(images)))
    written = len(store.indices(index))
    drawn += written
    if first_batch_seconds is None:  # includes compiling the sampler
      first_batch_seconds, steady_start = time.time() - start, time.time()
    else:
      after_first += written
    bar.update(written)
    if after_first:
      bar.set_postfix(images_per_second=f'{after_first / (time.time() - steady_start):.2f}')
  bar.close()
  seconds = time.time() - start
  steady = after_first / (time.time() - steady_start) if after_first else None
  return {'drawn': drawn, 'skipped': store.count - drawn, 'seconds': round(seconds, 1),
          'first_batch_seconds': None if first_batch_seconds is None else round(first_batch_seconds, 1),
          'images_per_second': None if steady is None else round(steady, 3)}


def evaluate_diffusion(config, workdir) -> dict:
  count, batch_size = config.eval.num_samples, config.sample.batch_size
  network = features.make_feature_network(config)
  # Before sampling: a reference file of another network fails now, not after hours of sampling.
  reference = features.reference_statistics(
      config, network, config.eval.stats_dir or Path(workdir).absolute() / 'reference_stats')
  mesh = sharding.make_mesh(config.mesh)
  if batch_size % mesh.size:
    raise ConfigError(f'sample.batch_size: {batch_size} does not divide over the {mesh.size} devices of the mesh')
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  model, params, scale_factor, step = sample_mode.restore_denoiser(config, workdir, mesh)
  tokenizer = diffusion.make_tokenizer(config)
  tag = diffusion.sampler_tag(config)
  directory = common.stage_dir(workdir, diffusion.STAGE)
  store = SampleStore(directory / 'eval_samples' / f'step{int(step)}_{tag}_seed{config.sample.seed}',
                      config.eval.sample_format, batch_size, count)
  sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config),
                                   tokenizer=tokenizer, mesh=mesh)
  timing = draw_to_store(config, store, sampler, params, ae_params, scale_factor,
                         sample_inputs(config, count, tokenizer), mesh)
  multihost_utils.sync_global_devices('eval_diffusion samples written')
  if jax.process_index() != 0:
    return {}  # process 0, which wrote the samples, measures them
  start = time.time()
  sample_features, sample_logits = features.extract_all(network, store.batches())
  results = {
      'step': int(step), 'num_samples': count, 'sampler': config.sample.sampler,
      'num_steps': config.sample.num_steps, 'eta': config.sample.eta,
      'guidance_scale': config.sample.guidance_scale, 'feature_network': network.name,
      'reference': reference['meta'].get('data', config.eval.reference_stats),
      'num_reference_images': reference['meta'].get('num_images', None),
      **features.sample_quality(network, sample_features, sample_logits, reference, config),
      'sampling': timing, 'samples': str(store.directory),
      'measure_seconds': round(time.time() - start, 1), 'num_devices': mesh.size,
  }
  loop.save_json(directory / 'eval.json', results)
  loop.save_json(directory / f'eval_{tag}_n{count}_step{int(step)}.json', results)
  logging.info('eval_diffusion: %s', json.dumps(results))
  print(json.dumps(results, indent=2))
  return results
