"""img2img (SDEdit) strength sweep on a trained unconditional LDM: how far the samples move from their
start image, and how much they differ from each other, as sample.strength grows.

For each of the first --faces held-out images and each strength, --samples samples start from that image
(the sample-mode path: diffusion.make_sampler with inputs['init_image']). Reported per strength, averaged
over the faces: the PSNR of each sample against its start image, the PSNR of the stage-1 reconstruction
(the ceiling at strength -> 0), and the spread of the samples of one face (the mean per-pixel standard
deviation across them, in [0, 1] units). Writes <out>/img2img_strength.json and <out>/img2img_strength.png
(a row per face: the start image, then the first sample at each strength).

  python experiments/img2img_strength.py --workdir=OUT/workdirs/ldm4 --f=4 --out=OUT/img2img

--workdir is an LDM of a full-mode run of experiments/f_sweep.py (its config is rebuilt from --f).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments import f_sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion import images, sample, sample_inputs  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.evaluate.metrics import image_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.train import autoencoder as stage1  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.train import diffusion, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position


def mean_psnr(truth: np.ndarray, samples: np.ndarray) -> float:
  """Mean per-image PSNR (dB) of [-1, 1] samples against `truth`, broadcast to their shape
  (metrics.image_metrics)."""
  flat = lambda a: jnp.asarray(np.broadcast_to(a, samples.shape).reshape((-1,) + samples.shape[-3:]))
  return float(np.mean(image_metrics(flat(truth), flat(samples))[0]))


def sweep(config, workdir: str, starts: np.ndarray, strengths, samples_per_face: int, seed: int = 0):
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  model, params, scale_factor, step = sample.restore_denoiser(config, workdir, mesh)
  reconstructions = np.clip(np.asarray(diffusion.decode_latents(
      autoencoder, ae_params, diffusion.init_latents(config, autoencoder, ae_params, jnp.asarray(starts),
                                                     scale_factor), scale_factor)), -1, 1)
  faces = len(starts)
  init = np.repeat(starts, samples_per_face, axis=0)  # face i's samples are rows i*K .. i*K + K - 1
  rows, firsts = [], []
  for strength in strengths:
    with config.unlocked():
      config.sample.strength = strength
    sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config))
    drawn = sample.draw_samples(config, sampler, params, ae_params, scale_factor, {'init_image': init},
                                len(init), seed).reshape((faces, samples_per_face) + starts.shape[1:])
    spread = np.mean(np.std((drawn + 1) / 2, axis=1))
    rows.append({'strength': strength, 'psnr_to_start': mean_psnr(starts[:, None], drawn), 'spread': float(spread)})
    firsts.append(drawn[:, 0])
    print(json.dumps(rows[-1]))
  grid = np.concatenate([starts[:, None]] + [f[:, None] for f in firsts], axis=1)
  return {'step': int(step), 'reconstruction_psnr': mean_psnr(starts, reconstructions),
          'faces': faces, 'samples_per_face': samples_per_face, 'sampler': diffusion.sampler_tag(config),
          'strengths': rows}, grid


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='an LDM workdir of experiments/f_sweep.py')
  parser.add_argument('--f', type=int, required=True, help='its downsampling factor')
  parser.add_argument('--out', required=True)
  parser.add_argument('--data_root', default=os.environ.get('LDM_DATA', str(REPO.parent / 'shared' / 'data')))
  parser.add_argument('--faces', type=int, default=8)
  parser.add_argument('--samples', type=int, default=4)
  parser.add_argument('--strengths', default='0.2,0.4,0.6,0.8,1.0')
  args = parser.parse_args(argv)
  config = f_sweep.sweep_config(args.f, f_sweep.FULL, args.data_root, '', '')
  with config.unlocked():
    config.sample.batch_size = args.faces * args.samples
  paths = sorted(Path(config.data.eval_path).iterdir())[:args.faces]
  starts = np.stack([sample_inputs.read_image(str(p), 'start image') for p in paths])
  result, grid = sweep(config, args.workdir, starts, [float(s) for s in args.strengths.split(',')], args.samples)
  result['start_images'] = [p.name for p in paths]
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'img2img_strength.json').write_text(json.dumps(result, indent=2) + '\n')
  images.save_grid(out / 'img2img_strength.png', grid.reshape((-1,) + grid.shape[2:]), columns=grid.shape[1])
  print(json.dumps({k: v for k, v in result.items() if k != 'start_images'}, indent=2))


if __name__ == '__main__':
  main()
