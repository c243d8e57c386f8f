"""Feature networks for sample-quality metrics, and the cached statistics of reference sets.

eval.feature_network picks the network whose features the Frechet distance is taken on:

  inception   the FID Inception-v3 (evaluate/inception.py) read from eval.inception_path: "FID" and "IS"
  classifier  our classifier (evaluate/classifier.py) read from eval.classifier_path, trained on a real
              labelled set: "FD-<dataset>" and "IS-<dataset>". Never called FID: the numbers are not
              comparable with published FIDs, only with each other.

Reference statistics (features, mu, sigma of N real images) are computed once and cached as an .npz
named by a hash of what they depend on (data source and split, image size, number of images, feature
network and its weights, resize). The file also records them, so a statistics file given by hand
(eval.reference_stats) is refused when it was made with another feature network or resolution.
"""

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from absl import logging

from latent_diffusion.data import pipeline
from latent_diffusion.errors import ConfigError
from latent_diffusion.evaluate import metrics

FEATURE_NETWORKS = ('inception', 'classifier')
REFERENCE_SPLITS = ('train', 'eval')
RESIZE_MODES = ('pytorch_fid', 'clean')
SAMPLE_FORMATS = ('npz', 'png')
INCEPTION_NAME = 'fid_inception_v3'


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """extract(images (N, H, W, 3) in [-1, 1]) -> (features (N, D), logits (N, C)), numpy float32."""
  name: str            # 'fid_inception_v3' or 'classifier_<dataset>'
  distance_name: str   # 'FID' or 'FD-<dataset>'
  score_name: str      # 'IS' or 'IS-<dataset>'
  kernel_name: str     # 'KID' or 'KD-<dataset>'
  fingerprint: str     # of the weights file: statistics of other weights are not reused
  resize: str          # how images reach the network's input size
  feature_dim: int     # D
  extract: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _file_fingerprint(path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def classifier_dataset(config) -> str:
  """The data set the feature classifier was trained on: eval.feature_dataset, else the file that
  `python -m latent_diffusion.evaluate.classifier` writes beside the weights (<out>.json)."""
  if config.eval.feature_dataset:
    return config.eval.feature_dataset
  info = Path(str(config.eval.classifier_path) + '.json')
  if info.is_file():
    return json.loads(info.read_text())['data']
  raise ConfigError(f'eval.feature_dataset: name the data set the classifier {config.eval.classifier_path} was '
                    f'trained on (no {info} records it); its distance is reported as FD-<dataset>')


def check_config(config) -> None:
  """The eval.* fields of sample-quality metrics, each failing with its name before anything runs."""
  evaluation = config.eval
  if evaluation.feature_network not in FEATURE_NETWORKS:
    raise ConfigError(f'eval.feature_network: must be one of {", ".join(FEATURE_NETWORKS)} '
                      f'(inception needs eval.inception_path), got {evaluation.feature_network!r}')
  field = 'inception_path' if evaluation.feature_network == 'inception' else 'classifier_path'
  path = evaluation[field]
  if not path or not Path(path).is_file():
    hint = (' (pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth; nothing here can download it)'
            if field == 'inception_path' else ' (python -m latent_diffusion.evaluate.classifier --out=PATH)')
    raise ConfigError(f'eval.{field}: no file at {path!r}{hint}')
  if evaluation.inception_resize not in RESIZE_MODES:
    raise ConfigError(f'eval.inception_resize: must be one of {", ".join(RESIZE_MODES)}, '
                      f'got {evaluation.inception_resize!r}')
  if evaluation.reference_split not in REFERENCE_SPLITS:
    raise ConfigError(f'eval.reference_split: must be one of {", ".join(REFERENCE_SPLITS)}, '
                      f'got {evaluation.reference_split!r}')
  if evaluation.sample_format not in SAMPLE_FORMATS:
    raise ConfigError(f'eval.sample_format: must be one of {", ".join(SAMPLE_FORMATS)}, '
                      f'got {evaluation.sample_format!r}')
  if evaluation.reference_stats and not Path(evaluation.reference_stats).is_file():
    raise ConfigError(f'eval.reference_stats: no file at {evaluation.reference_stats}')
  for name, least in (('num_samples', 2), ('kid_subset_size', 2), ('precision_recall_k', 1),
                      ('reference_images', 0)):
    if evaluation[name] < least:
      raise ConfigError(f'eval.{name}: must be >= {least}, got {evaluation[name]}')


def make_feature_network(config) -> FeatureNetwork:
  check_config(config)
  name = config.eval.feature_network
  if name == 'inception':
    from latent_diffusion.evaluate import inception  # pylint: disable=g-import-not-at-top
    variables = inception.load_fid_inception_params(config.eval.inception_path)
    feature_fn = inception.make_feature_fn(variables, resize=config.eval.inception_resize,
                                           batch_size=config.eval.batch_size)

    def extract(images):
      outputs = feature_fn(images)
      return outputs['pool3'], outputs['logits']

    return FeatureNetwork(INCEPTION_NAME, 'FID', 'IS', 'KID', _file_fingerprint(config.eval.inception_path),
                          f'{config.eval.inception_resize} to 299', inception.FEATURES, extract)
  from latent_diffusion.evaluate import classifier  # pylint: disable=g-import-not-at-top
  dataset = classifier_dataset(config)
  variables = classifier.load_classifier(config.eval.classifier_path)

  def extract(images):
    logits, feats = classifier.outputs(variables, images)
    return feats, logits

  return FeatureNetwork(f'classifier_{dataset}', f'FD-{dataset}', f'IS-{dataset}', f'KD-{dataset}',
                        _file_fingerprint(config.eval.classifier_path),
                        f'average-pooled to about {classifier.INPUT_SIDE} px', classifier.WIDTHS[-1], extract)


def extract_all(network: FeatureNetwork, batches) -> tuple[np.ndarray, np.ndarray]:
  """(features, logits) of an iterable of image batches."""
  features, logits = [], []
  for images in batches:
    batch_features, batch_logits = network.extract(np.asarray(images, np.float32))
    features.append(batch_features)
    logits.append(batch_logits)
  return np.concatenate(features), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------------
# Reference statistics


def reference_data_config(config):
  """config.data of the reference images: eval.reference_split of the data set, center-cropped, unflipped."""
  from latent_diffusion.evaluate import autoencoder  # pylint: disable=g-import-not-at-top
  split = config.eval.reference_split
  if split not in REFERENCE_SPLITS:
    raise ConfigError(f'eval.reference_split: must be one of {", ".join(REFERENCE_SPLITS)}, got {split!r}')
  if split == 'eval':
    return autoencoder.eval_data_config(config)
  data_config = config.data.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.flip, data_config.crop = False, 'center'
  return data_config


def _reference_key(network: FeatureNetwork, data_config, description: str, count: int) -> dict:
  return {'feature_network': network.name, 'weights': network.fingerprint, 'resize': network.resize,
          'resolution': int(data_config.image_size), 'data': description, 'num_images': count}


def _check_matches(meta: dict, expected: dict, path) -> None:
  for field in ('feature_network', 'resolution'):
    if field in meta and meta[field] != expected[field]:
      raise ConfigError(f'eval.reference_stats: {path} was computed with {field} {meta[field]!r}, this '
                        f'evaluation uses {expected[field]!r}; compute statistics with the same network and '
                        'resolution (leave eval.reference_stats empty to have them computed and cached)')


def load_statistics(path, expected: dict, feature_dim: int) -> dict:
  """{'mu', 'sigma', ['features'], 'meta'} of a statistics .npz (ours, or pytorch-fid's mu/sigma files)."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f'eval.reference_stats: no file at {path}')
  with np.load(path, allow_pickle=False) as data:
    stored = {name: data[name] for name in data.files}
  if 'mu' not in stored or 'sigma' not in stored:
    raise ConfigError(f'eval.reference_stats: {path} holds no mu and sigma (found {sorted(stored)})')
  meta = json.loads(str(stored.pop('meta'))) if 'meta' in stored else {}
  if not meta and expected['feature_network'] != INCEPTION_NAME:
    raise ConfigError(f'eval.reference_stats: {path} records no feature network (a pytorch-fid statistics '
                      f'file is Inception statistics), this evaluation uses {expected["feature_network"]!r}')
  _check_matches(meta, expected, path)
  if stored['mu'].shape != (feature_dim,):
    raise ConfigError(f'eval.reference_stats: {path} holds {stored["mu"].shape[0]}-dimensional statistics, '
                      f'{expected["feature_network"]} features have {feature_dim} dimensions')
  return dict(stored, meta=meta)


def compute_reference_features(config, network: FeatureNetwork, data_config, count: int):
  """(features, logits) of the first `count` images of the reference split, in a fixed order."""
  from latent_diffusion.evaluate import autoencoder  # pylint: disable=g-import-not-at-top
  source = autoencoder.First(pipeline.make_source(data_config), count)
  batch_size = config.eval.batch_size
  iterator = pipeline.make_iterator(data_config, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                                    drop_remainder=False, source=source, process_index=0, process_count=1)
  return extract_all(network, (batch['image'] for batch in iterator))


def reference_statistics(config, network: FeatureNetwork, cache_dir) -> dict:
  """{'mu', 'sigma', 'features' (absent for a hand-given mu/sigma file), 'meta'} of the reference set:
  eval.reference_stats when given, else read from or written to `cache_dir`."""
  data_config = reference_data_config(config)
  source = pipeline.make_source(data_config)
  count = len(source) if not config.eval.reference_images else min(config.eval.reference_images, len(source))
  expected = _reference_key(network, data_config, pipeline.describe(data_config, source), count)
  if config.eval.reference_stats:
    return load_statistics(config.eval.reference_stats, expected, network.feature_dim)
  digest = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
  path = Path(cache_dir) / f'{network.name}_{data_config.image_size}px_{count}_{digest}.npz'
  if path.is_file():
    logging.info('reference statistics: reusing %s', path)
    with np.load(path, allow_pickle=False) as data:
      return {'mu': data['mu'], 'sigma': data['sigma'], 'features': data['features'],
              'meta': json.loads(str(data['meta']))}
  start = time.time()
  features, _ = compute_reference_features(config, network, data_config, count)
  mu, sigma = metrics.feature_statistics(features, f'reference set ({count} images)')
  meta = dict(expected, seconds=round(time.time() - start, 1))
  path.parent.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:  # every process computed the same statistics
    partial = path.with_suffix('.partial.npz')
    np.savez(partial, mu=mu, sigma=sigma, features=features, meta=np.asarray(json.dumps(meta)))
    partial.replace(path)
  logging.info('reference statistics: %d images in %.0f s -> %s', count, meta['seconds'], path)
  return {'mu': mu, 'sigma': sigma, 'features': features, 'meta': meta}


def sample_quality(network: FeatureNetwork, features, logits, reference: dict, config) -> dict:
  """FD (named for the network), IS, KID, precision and recall of sample features against a reference."""
  mu, sigma = metrics.feature_statistics(features, f'samples ({len(features)})')
  results = {network.distance_name: metrics.frechet_distance(mu, sigma, reference['mu'], reference['sigma'])}
  splits = min(10, len(logits))
  results[network.score_name], results[f'{network.score_name}_std'] = metrics.inception_score(logits, splits)
  if 'features' not in reference:
    results[network.kernel_name] = results['precision'] = results['recall'] = (
        'not measured: the reference statistics file holds no features')
    return results
  real = reference['features']
  kid_mean, kid_std = metrics.kernel_distance(real, features, subset_size=config.eval.kid_subset_size)
  results[network.kernel_name], results[f'{network.kernel_name}_std'] = kid_mean, kid_std
  results.update(metrics.precision_recall(real, features, k=config.eval.precision_recall_k))
  return results

