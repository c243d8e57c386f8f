"""The downsampling-factor sweep of the paper's Figures 6 and 7, on UTKFace faces, on this machine.

LDM-f for f in 1, 2, 4, 8, 16: f = 1 diffuses the pixels (no first stage, the paper's LDM-1), every
other f a KL autoencoder of the same family (ch 32, one ResnetBlock per level, L1 + KL, latent channels
3, 3, 4, 16 for f = 2, 4, 8, 16 as the paper's KL models), all trained for the same steps. The U-Net is
one family with the same width, its depth scaled to the latent side as the paper's: levels down to an
8x8 (at least 2x2) bottom, attention at latent sides 16 to 4. f = 32 is left out: 64 / 32 leaves a 2x2
latent, too small for a U-Net level.

Per f it reports: stage-1 reconstruction quality on utkface64/val (PSNR, SSIM, rFD-utkface64),
stage-2 training throughput (the median logged steps/s), FD-utkface64 of samples along training
(DDIM, eval_diffusion), and samples/s at fixed sampler steps (after compilation). FD-utkface64 is the
Frechet distance in the features of our race classifier trained on utkface64/train
(evaluate/classifier.py): comparable between the runs of this sweep, not with published FIDs.

  python experiments/f_sweep.py --out=experiments/results/f_sweep          # full: ~90 min on 2 cores
  python experiments/f_sweep.py --quick --out=/tmp/f_sweep                   # the whole sweep, small
  python experiments/f_sweep.py --out=OUT --compare_samplers=8               # then samplers on LDM-8

It writes <out>/results.json, <out>/fd_vs_steps.png (Figure 6), <out>/fd_vs_throughput.png (Figure 7),
and keeps each run's workdir under <out>/workdirs/ldm<f> (a run started again resumes: finished stages
and evaluations are skipped). experiments/f_sweep.ipynb plots results.json.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

LATENT_CHANNELS = {2: 3, 4: 3, 8: 4, 16: 16}


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every f gets: the same data, steps, batch sizes and evaluation."""
  factors: tuple[int, ...]
  image_size: int
  autoencoder_steps: int
  autoencoder_batch: int
  diffusion_steps: int
  diffusion_batch: int
  eval_every: int             # FD along training at these step multiples
  eval_samples: int
  reference_images: int
  sampler_steps: int          # DDIM steps of every FD and throughput measurement
  sample_batch: int
  model_channels: int
  classifier_steps: int
  reconstruction_images: int


FULL = Budget(factors=(1, 2, 4, 8, 16), image_size=64, autoencoder_steps=250, autoencoder_batch=8,
              diffusion_steps=600, diffusion_batch=16, eval_every=300, eval_samples=300, reference_images=2000,
              sampler_steps=20, sample_batch=50, model_channels=32, classifier_steps=1500,
              reconstruction_images=300)
QUICK = Budget(factors=(1, 2, 4, 8), image_size=32, autoencoder_steps=4, autoencoder_batch=8,
               diffusion_steps=4, diffusion_batch=8, eval_every=4, eval_samples=16, reference_images=32,
               sampler_steps=2, sample_batch=8, model_channels=32, classifier_steps=4, reconstruction_images=16)


def unet_layout(latent_side: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(channel_mult, attention_resolutions) of the U-Net on a latent_side^2 latent: levels halve the side
  down to 8 (at least 2 levels, at most 4; the bottom at least 2x2), attention where the side is 4..16."""
  levels = max(2, min(4, int(math.log2(latent_side)) - 2))
  while latent_side >> (levels - 1) < 2:
    levels -= 1
  channel_mult = (1,) + (2,) * (levels - 1)
  attention = tuple(2 ** level for level in range(levels) if 4 <= latent_side >> level <= 16)
  return channel_mult, attention


def sweep_config(f: int, budget: Budget, data_root: str, classifier_path: str, stats_dir: str):
  """The full config of LDM-f under `budget`."""
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  data = config.data
  data.source, data.label_column, data.crop, data.flip = 'folder', '', 'center', True
  data.path, data.eval_path = f'{data_root}/utkface64/train', f'{data_root}/utkface64/val'
  data.image_size = budget.image_size
  config.log_every_steps = 50

  ae = config.autoencoder
  if f == 1:
    ae.kind = 'identity'
  else:
    levels = int(math.log2(f)) + 1
    ae.kind, ae.ch, ae.ch_mult, ae.num_res_blocks = 'kl', 32, (1,) + (2,) * (levels - 1), 1
    ae.attn_resolutions, ae.z_channels = (), LATENT_CHANNELS[f]
    ae.embed_dim = LATENT_CHANNELS[f]
  loss = config.autoencoder_loss
  loss.pixel_loss, loss.kl_weight, loss.perceptual_weight, loss.disc_start = 'l1', 1e-6, 0.0, 10**9
  train = config.autoencoder_train
  train.batch_size, train.num_steps, train.learning_rate, train.warmup_steps = (
      budget.autoencoder_batch, budget.autoencoder_steps, 4e-4, min(50, budget.autoencoder_steps // 4))
  train.checkpoint_every_steps = train.sample_every_steps = budget.autoencoder_steps
  train.eval_every_steps = 0

  unet = config.unet
  unet.model_channels, unet.num_res_blocks, unet.num_heads = budget.model_channels, 1, 4
  unet.channel_mult, unet.attention_resolutions = unet_layout(budget.image_size // f)
  d = config.diffusion
  d.loss_type, d.linear_start, d.linear_end = 'l2', 0.0015, 0.0195
  d.scale_by_std = f > 1  # pixels are already in [-1, 1]
  dt = config.diffusion_train
  dt.batch_size, dt.num_steps, dt.learning_rate = budget.diffusion_batch, budget.diffusion_steps, 5e-4
  dt.warmup_steps, dt.ema_decay = min(100, budget.diffusion_steps // 4), 0.999
  dt.checkpoint_every_steps, dt.sample_every_steps = budget.eval_every, 0

  s = config.sample
  s.sampler, s.num_steps, s.eta, s.batch_size, s.num_samples = 'ddim', budget.sampler_steps, 0.0, budget.sample_batch, 16
  e = config.eval
  e.feature_network, e.classifier_path, e.stats_dir = 'classifier', classifier_path, stats_dir
  e.feature_dataset = 'utkface64'  # the classifier's training set: distances are FD-utkface64
  e.num_samples, e.reference_images, e.reference_split = budget.eval_samples, budget.reference_images, 'train'
  e.num_images, e.batch_size = budget.reconstruction_images, 50
  e.kid_subset_size = min(1000, budget.eval_samples)
  return config


def _quiet(function, *args):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # FewSamplesWarning in quick mode, scipy's singular-matrix note
    return function(*args)


def ensure_classifier(budget: Budget, data_root: str, out: Path, given: str) -> str:
  """The FD feature network: --classifier, or one trained on utkface64/train and kept in <out>."""
  from latent_diffusion.evaluate import classifier  # pylint: disable=g-import-not-at-top
  if given:
    return given
  path = out / f'classifier_utkface64_{budget.classifier_steps}.msgpack'
  if not path.is_file():
    data_config, eval_path = classifier.dataset_config('utkface64', data_root)
    variables, info = classifier.train_classifier(data_config, eval_path, budget.classifier_steps, 64, 0,
                                                  log_every=0)
    classifier.save_classifier(path, variables, {'data': 'utkface64', **info})
  return str(path)


def sampling_throughput(config, workdir: Path, repeats: int = 3) -> float:
  """Samples/s of DDIM-<sample.num_steps> at sample.batch_size, compilation excluded."""
  import jax  # pylint: disable=g-import-not-at-top
  from latent_diffusion import sample as sample_mode  # pylint: disable=g-import-not-at-top
  from latent_diffusion.train import autoencoder as stage1  # pylint: disable=g-import-not-at-top
  from latent_diffusion.train import diffusion, sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  model, params, scale_factor, _ = sample_mode.restore_denoiser(config, workdir, mesh)
  sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config), mesh=mesh)
  draw = lambda seed: sampler(params, ae_params, scale_factor, jax.random.PRNGKey(seed), {},
                              num_samples=config.sample.batch_size, num_steps=config.sample.num_steps)
  jax.block_until_ready(draw(0))  # compile
  start = time.perf_counter()
  for seed in range(1, repeats + 1):
    jax.block_until_ready(draw(seed))
  return repeats * config.sample.batch_size / (time.perf_counter() - start)


def run_factor(f: int, budget: Budget, data_root: str, out: Path, classifier_path: str) -> dict:
  """Trains and measures LDM-f; what was already done in <out>/workdirs/ldm<f> is read back."""
  from latent_diffusion import main  # pylint: disable=g-import-not-at-top
  workdir = out / 'workdirs' / f'ldm{f}'
  record_path = workdir / 'sweep_record.json'
  record = json.loads(record_path.read_text()) if record_path.is_file() else {'f': f, 'fd_along_training': []}
  config = sweep_config(f, budget, data_root, classifier_path, str(out / 'reference_stats'))
  save = lambda: record_path.write_text(json.dumps(record, indent=2) + '\n')
  workdir.mkdir(parents=True, exist_ok=True)

  if f > 1 and 'autoencoder' not in record:
    start = time.time()
    with config.unlocked():
      config.mode = 'train_autoencoder'
    main.run(config, str(workdir))
    seconds = time.time() - start
    with config.unlocked():
      config.mode = 'eval_autoencoder'
    _quiet(main.run, config, str(workdir))
    quality = json.loads((workdir / 'autoencoder' / 'eval.json').read_text())
    record['autoencoder'] = {'steps': budget.autoencoder_steps, 'train_seconds': round(seconds, 1),
                             **{k: quality[k] for k in ('psnr', 'ssim', 'rFD-utkface64') if k in quality}}
    save()
  if f == 1:
    record['autoencoder'] = {'psnr': None, 'note': 'no first stage: the pixels themselves'}

  done = {entry['step'] for entry in record['fd_along_training']}
  for step in range(budget.eval_every, budget.diffusion_steps + 1, budget.eval_every):
    if step in done:
      continue
    with config.unlocked():
      config.mode, config.diffusion_train.num_steps = 'train_diffusion', step
    start = time.time()
    main.run(config, str(workdir))
    train_seconds = time.time() - start
    with config.unlocked():
      config.mode = 'eval_diffusion'
    _quiet(main.run, config, str(workdir))
    results = json.loads((workdir / 'diffusion' / 'eval.json').read_text())
    record['fd_along_training'].append({
        'step': step, 'train_seconds': round(train_seconds, 1), 'FD-utkface64': results['FD-utkface64'],
        'KD-utkface64': results.get('KD-utkface64'), 'precision': results.get('precision'),
        'recall': results.get('recall'), 'sampling_seconds': results['sampling']['seconds']})
    save()
  if 'samples_per_second' not in record:
    with config.unlocked():
      config.diffusion_train.num_steps = budget.diffusion_steps
    record['samples_per_second'] = round(sampling_throughput(config, workdir), 3)
    save()
  train_seconds = sum(entry['train_seconds'] for entry in record['fd_along_training'])
  steps_per_second = logged_steps_per_second(workdir / 'diffusion' / 'metrics.jsonl')
  record['diffusion'] = {'steps': budget.diffusion_steps, 'batch_size': budget.diffusion_batch,
                         'wall_seconds': round(train_seconds, 1), 'steps_per_second': round(steps_per_second, 3),
                         'images_per_second': round(steps_per_second * budget.diffusion_batch, 2),
                         'latent': list(latent_of(config)), 'unet_channel_mult': list(config.unet.channel_mult),
                         'unet_attention_resolutions': list(config.unet.attention_resolutions)}
  save()
  return record


def logged_steps_per_second(metrics_path: Path) -> float:
  """The median training speed logged in metrics.jsonl: robust to the intervals that include a
  compilation (the first of each train_diffusion run) or a checkpoint save."""
  from latent_diffusion.train import loop  # pylint: disable=g-import-not-at-top
  speeds = [record['steps_per_second'] for record in loop.read_metrics(metrics_path).values()
            if 'steps_per_second' in record]
  return float(statistics.median(speeds)) if speeds else float('nan')


def latent_of(config) -> tuple[int, int, int]:
  from latent_diffusion.train import diffusion  # pylint: disable=g-import-not-at-top
  return diffusion.latent_shape(config)


def plot(results: dict, out: Path) -> list[Path]:
  """Figure 6 (FD against training steps) and Figure 7 (final FD against samples/s), as PNGs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = sorted(results['runs'].values(), key=lambda run: run['f'])
  figure, axis = plt.subplots(figsize=(5, 3.5))
  for run in runs:
    curve = sorted(run['fd_along_training'], key=lambda entry: entry['step'])
    axis.plot([e['step'] for e in curve], [e['FD-utkface64'] for e in curve], marker='o', label=f'LDM-{run["f"]}')
  axis.set(xlabel='training steps', ylabel='FD-utkface64', title='FD along training (cf. paper Fig. 6)')
  axis.legend()
  figure.tight_layout()
  paths = [out / 'fd_vs_steps.png']
  figure.savefig(paths[0], dpi=120)
  figure, axis = plt.subplots(figsize=(5, 3.5))
  for run in runs:
    final = max(run['fd_along_training'], key=lambda entry: entry['step'])
    axis.scatter(run['samples_per_second'], final['FD-utkface64'], s=40)
    axis.annotate(f'LDM-{run["f"]}', (run['samples_per_second'], final['FD-utkface64']))
  axis.set(xscale='log', xlabel=f'samples/s (DDIM-{results["budget"]["sampler_steps"]})', ylabel='FD-utkface64',
           title='quality vs sampling speed (cf. paper Fig. 7)')
  figure.tight_layout()
  paths.append(out / 'fd_vs_throughput.png')
  figure.savefig(paths[1], dpi=120)
  plt.close('all')
  return paths


def run_sweep(budget: Budget, out: Path, data_root: str, classifier: str = '') -> dict:
  out.mkdir(parents=True, exist_ok=True)
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(out / 'jax_cache'))
  start = time.time()
  classifier_path = ensure_classifier(budget, data_root, out, classifier)
  runs = {}
  for f in budget.factors:
    runs[str(f)] = run_factor(f, budget, data_root, out, classifier_path)
    print(f'LDM-{f}: {json.dumps(runs[str(f)])}', flush=True)
  results = {'budget': dataclasses.asdict(budget), 'classifier': classifier_path, 'runs': runs,
             'wall_seconds_this_invocation': round(time.time() - start, 1)}
  (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
  plot(results, out)
  return results


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='results folder (workdirs, results.json, plots)')
  parser.add_argument('--quick', action='store_true', help='the whole sweep at 32 px, a few steps each')
  parser.add_argument('--factors', default='', help='comma-separated f values (default: the budget\'s)')
  parser.add_argument('--classifier', default='', help='an FD classifier trained on utkface64 (default: train one)')
  parser.add_argument('--data_root', default=os.environ.get('LDM_DATA', str(REPO.parent / 'shared' / 'data')))
  parser.add_argument('--compare_samplers', type=int, default=0,
                      help='then compare DDIM, PLMS and DPM-Solver++ on the sweep\'s LDM-<f> (experiments/samplers.py), '
                           'written to <out>/samplers')
  parser.add_argument('--sampler_steps', default='10,25,50,100,200', help='the sampler comparison\'s step counts')
  return parser.parse_args(argv)


def compare_samplers(f: int, budget: Budget, out: Path, data_root: str, classifier: str, steps) -> dict:
  """experiments/samplers.py on the sweep's trained LDM-<f>: FD of budget.eval_samples samples per
  (sampler, steps), against the sweep's reference statistics."""
  from experiments import samplers  # pylint: disable=g-import-not-at-top
  config = sweep_config(f, budget, data_root, ensure_classifier(budget, data_root, out, classifier),
                        str(out / 'reference_stats'))
  return samplers.compare(config, str(out / 'workdirs' / f'ldm{f}'), samplers.SAMPLERS, steps, out / 'samplers')


if __name__ == '__main__':
  args = parse_args()
  chosen = QUICK if args.quick else FULL
  if args.factors:
    chosen = dataclasses.replace(chosen, factors=tuple(int(f) for f in args.factors.split(',')))
  run_sweep(chosen, Path(args.out), args.data_root, args.classifier)
  if args.compare_samplers:
    compare_samplers(args.compare_samplers, chosen, Path(args.out), args.data_root, args.classifier,
                     [int(step) for step in args.sampler_steps.split(',')])
