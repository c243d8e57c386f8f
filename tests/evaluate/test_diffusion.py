"""eval_diffusion on a tiny model trained here: the samples it writes, the metrics it reports (recomputed
independently from those samples and pytorch-fid's Frechet distance), resuming, the reference cache,
and eval_autoencoder's rFD."""

import json
import warnings

import jax
import numpy as np
import pytest

from latent_diffusion import main
from latent_diffusion.data import pipeline
from latent_diffusion.errors import ConfigError
from latent_diffusion.evaluate import autoencoder as autoencoder_eval
from latent_diffusion.evaluate import classifier, features, metrics
from latent_diffusion.train import autoencoder as stage1
from tests import tiny_config

def _config(mode, classifier_path):
  config = tiny_config.get_config()
  with config.unlocked():
    config.mode = mode
    config.autoencoder_train.num_steps = config.diffusion_train.num_steps = 2
    config.sample.batch_size, config.sample.num_steps = 4, 2
    config.data.synthetic_size = 24
    config.eval.num_samples = 10  # batches of 4, 4, 2 (the last one padded when drawn)
    config.eval.batch_size = 8
    config.eval.num_images = 10
    config.eval.feature_network, config.eval.classifier_path = 'classifier', str(classifier_path)
    config.eval.reference_images = 20
    config.eval.kid_subset_size = 8
  return config


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  """(workdir, classifier path, eval.json) after training both tiny stages and one eval_diffusion run."""
  root = tmp_path_factory.mktemp('eval_diffusion')
  variables = jax.tree.map(lambda leaf: np.random.default_rng(0).normal(size=leaf.shape).astype(leaf.dtype) * 0.3,
                           classifier.abstract_variables(3, 16))
  variables['batch_stats'] = jax.tree.map(np.abs, variables['batch_stats'])  # running variances > 0
  path = classifier.save_classifier(root / 'features.msgpack', variables, {'data': 'shapes16'})
  workdir = root / 'work'
  main.run(_config('train', path), str(workdir))
  config = _config('eval_diffusion', path)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', metrics.FewSamplesWarning)  # 10 samples of 128-d features
    main.run(config, str(workdir))
  return workdir, path, json.loads((workdir / 'diffusion' / 'eval.json').read_text())


def _stored_samples(workdir):
  shards = sorted((workdir / 'diffusion' / 'eval_samples').glob('*/batch_*.npz'))
  return shards, np.concatenate([np.load(shard)['images'] for shard in shards])


def test_eval_diffusion_writes_every_sample_once_and_reports_what_drew_them(evaluated):
  workdir, _, results = evaluated
  shards, samples = _stored_samples(workdir)
  assert len(shards) == 3 and samples.shape == (10, 16, 16, 3) and samples.dtype == np.uint8
  assert results['num_samples'] == 10 and results['step'] == 2
  assert (results['sampler'], results['num_steps']) == ('ddim', 2)
  assert results['feature_network'] == 'classifier_shapes16' and results['sampling']['drawn'] == 10
  assert results['sampling']['images_per_second'] > 0
  assert not any('FID' in name for name in results)  # our classifier's distance is never called FID
  assert (workdir / 'diffusion' / 'eval_ddim2_eta0_n10_step2.json').is_file()


def test_eval_diffusion_metrics_equal_an_independent_computation_from_the_written_samples(evaluated):
  from pytorch_fid.fid_score import calculate_frechet_distance  # pylint: disable=g-import-not-at-top
  workdir, path, results = evaluated
  config = _config('eval_diffusion', path)
  variables = classifier.load_classifier(config.eval.classifier_path)
  _, samples = _stored_samples(workdir)
  logits, sample_features = classifier.outputs(variables, samples.astype(np.float32) / 127.5 - 1.0)
  data_config = features.reference_data_config(config)
  iterator = pipeline.make_iterator(data_config, batch_size=20, seed=0, shuffle=False, num_epochs=1,
                                    drop_remainder=False, process_index=0, process_count=1)
  real = classifier.features(variables, next(iterator)['image'])
  statistics = lambda f: (np.mean(f, axis=0), np.cov(f, rowvar=False))
  expected = calculate_frechet_distance(*statistics(sample_features), *statistics(real))
  np.testing.assert_allclose(results['FD-shapes16'], expected, rtol=1e-4)
  np.testing.assert_allclose(results['IS-shapes16'], metrics.inception_score(logits, 10)[0], rtol=1e-4)
  assert results['precision'] == pytest.approx(metrics.precision_recall(real, sample_features)['precision'])
  assert 'KD-shapes16' in results and results['num_reference_images'] == 20


def test_eval_diffusion_run_again_skips_written_batches_and_redraws_a_missing_one_identically(evaluated):
  workdir, path, _ = evaluated
  config = _config('eval_diffusion', path)
  shards, before = _stored_samples(workdir)
  times = [shard.stat().st_mtime_ns for shard in shards]
  shards[1].unlink()
  cache = sorted((workdir / 'reference_stats').glob('*.npz'))
  assert len(cache) == 1
  cache_time = cache[0].stat().st_mtime_ns
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', metrics.FewSamplesWarning)
    main.run(config, str(workdir))
  results = json.loads((workdir / 'diffusion' / 'eval.json').read_text())
  shards, after = _stored_samples(workdir)
  np.testing.assert_array_equal(after, before)
  assert shards[0].stat().st_mtime_ns == times[0] and shards[2].stat().st_mtime_ns == times[2]
  assert (results['sampling']['drawn'], results['sampling']['skipped']) == (4, 6)
  assert cache[0].stat().st_mtime_ns == cache_time  # the reference statistics were reused


def test_reference_statistics_of_another_network_are_refused_naming_both(evaluated, tmp_path):
  workdir, path, _ = evaluated
  config = _config('eval_diffusion', path)
  cached = sorted((workdir / 'reference_stats').glob('*.npz'))[0]
  with np.load(cached) as data:
    stored = dict(data)
  meta = json.loads(str(stored['meta']))
  np.savez(tmp_path / 'other.npz', **dict(stored, meta=np.asarray(json.dumps(dict(meta, feature_network='fid_inception_v3')))))
  with config.unlocked():
    config.eval.reference_stats = str(tmp_path / 'other.npz')
  with pytest.raises(ConfigError, match="fid_inception_v3.*classifier_shapes16"):
    main.run(config, str(workdir))
  np.savez(tmp_path / 'small.npz', **dict(stored, meta=np.asarray(json.dumps(dict(meta, resolution=256)))))
  with config.unlocked():
    config.eval.reference_stats = str(tmp_path / 'small.npz')
  with pytest.raises(ConfigError, match='resolution 256.*16'):
    main.run(config, str(workdir))


def test_eval_autoencoder_reports_the_reconstruction_fd_of_the_eval_images(evaluated):
  workdir, path, _ = evaluated
  config = _config('eval_diffusion', path)
  with config.unlocked():
    config.mode = 'eval_autoencoder'
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', metrics.FewSamplesWarning)
    main.run(config, str(workdir))
    results = json.loads((workdir / 'autoencoder' / 'eval.json').read_text())
    # Recomputed in one batch, apart from the evaluator's batches of 8 and 2 (the last one padded).
    model, params = stage1.load_params(config, workdir)
    images = next(pipeline.make_iterator(autoencoder_eval.eval_data_config(config), batch_size=10, seed=0,
                                         shuffle=False, num_epochs=1, drop_remainder=False,
                                         process_index=0, process_count=1))['image']
    reconstructions = np.clip(np.asarray(model.apply({'params': params}, images)[0]), -1, 1)
    network = features.make_feature_network(config)
    expected = metrics.frechet_distance(*metrics.feature_statistics(network.extract(images)[0]),
                                        *metrics.feature_statistics(network.extract(reconstructions)[0]))
  assert results['feature_network'] == 'classifier_shapes16' and results['num_images'] == 10
  assert expected > 0
  np.testing.assert_allclose(results['rFD-shapes16'], expected, rtol=1e-4)  # measured: 9e-8
  assert 'psnr' in results


@pytest.mark.parametrize('field, value, message', [
    ('feature_network', '', 'eval.feature_network: must be one of inception, classifier'),
    ('classifier_path', '/nonexistent/c.msgpack', "eval.classifier_path: no file at '/nonexistent/c.msgpack'"),
    ('sample_format', 'gif', 'eval.sample_format: must be one of npz, png'),
])
def test_eval_diffusion_bad_fields_are_named(evaluated, field, value, message):
  workdir, path, _ = evaluated
  config = _config('eval_diffusion', path)
  with config.unlocked():
    config.eval[field] = value
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    main.run(config, str(workdir))


def test_a_missing_inception_file_is_named_with_where_it_comes_from(evaluated):
  config = _config('eval_diffusion', evaluated[1])
  with config.unlocked():
    config.eval.feature_network, config.eval.inception_path = 'inception', '/nowhere/pt_inception.pth'
  with pytest.raises(ConfigError, match="no file at '/nowhere/pt_inception.pth'.*pt_inception-2015-12-05"):
    features.check_config(config)


@pytest.mark.parametrize('sample_format', ['npz', 'png'])
def test_sample_store_keeps_only_the_requested_count_and_reads_back_what_it_wrote(tmp_path, sample_format):
  from latent_diffusion.evaluate.diffusion import SampleStore  # pylint: disable=g-import-not-at-top
  store = SampleStore(tmp_path, sample_format, batch_size=4, count=6)
  images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 5, 5, 3), dtype=np.uint8)
  assert store.num_batches == 2 and not store.is_written(0)
  store.write(1, images[1])  # the last batch: 2 of its 4 samples are kept
  assert store.is_written(1) and not store.is_written(0)
  store.write(0, images[0])
  np.testing.assert_array_equal(store.read(1), images[1, :2])
  np.testing.assert_array_equal(np.concatenate(list(store.batches())),
                                np.concatenate([images[0], images[1, :2]]).astype(np.float32) / 127.5 - 1)
  assert not list(tmp_path.glob('*partial*'))


def test_sampler_comparison_measures_each_sampler_and_step_count_and_plots_them(evaluated, tmp_path):
  from experiments import samplers  # pylint: disable=g-import-not-at-top
  workdir, path, _ = evaluated
  config = _config('eval_diffusion', path)
  with config.unlocked():
    config.eval.num_samples = 8  # two batches: the second one timed
    config.sample.seed = 1  # samples the other tests did not write: nothing is skipped, every pair is timed
  results = samplers.compare(config, str(workdir), ['ddim', 'dpm_solver'], [2, 4], tmp_path)
  assert [(run['sampler'], run['num_steps']) for run in results['runs']] == [
      ('ddim', 2), ('ddim', 4), ('dpm_solver', 2), ('dpm_solver', 4)]
  assert len({run['samples'] for run in results['runs']}) == 4  # four sample sets, each measured
  for run in results['runs']:  # (a 2-step model barely depends on x: DDIM and PLMS images may coincide)
    tag = {'ddim': f'ddim{run["num_steps"]}_eta0'}.get(run['sampler'], f'{run["sampler"]}{run["num_steps"]}')
    written = json.loads((workdir / 'diffusion' / f'eval_{tag}_n8_step2.json').read_text())
    assert np.isfinite(run['FD-shapes16']) and run['FD-shapes16'] == written['FD-shapes16']
  assert all(run['samples_per_second'] > 0 for run in results['runs'])
  assert json.loads((tmp_path / 'results.json').read_text()) == results
  assert (tmp_path / 'fd_vs_steps.png').stat().st_size > 1000
