"""DDIM step count (and image-space guidance scale) of a super-resolution or inpainting model, chosen on
training images and reported on held-out ones (eval_conditional for each choice).

  python experiments/restoration_steps.py --config=configs/utkface_inpaint.py --workdir=W --out=OUT \
      --steps=5,10,25,50 --image_guidance_scales=0,0.03 --selection_path=../shared/data/utkface64/train \
      --selection_images=64 --config.eval.num_images=256

A deterministic DDIM sample (eta 0) with fewer steps carries less fine texture. PSNR rewards that,
while a perfect sampler pays 3 dB against the posterior mean (experiments/results/conditional). The
image-space guider (sample.image_guidance_scale) pulls each step's decoded clean estimate towards
what the input shows; its scale has to be chosen per task and model. So both are choices, and they
are made here without the held-out images: every pair of a step count and a scale is measured on the
first --selection_images images of --selection_path, and the pair with the best single-sample score
(PSNR, or masked-region PSNR for inpainting) is chosen. The eval split (data.eval_path,
eval.num_images) measures the --report_steps first (default: the config's sample.num_steps), at the
config's scale (the protocol of the earlier tables), so that a run cut short still has them, and the
chosen pair last. Writes <out>/results.json, and each measurement's JSON and grid (each input beside
its first sample) to <out>/selection/ and <out>/eval/. Results are keyed by label, `ddim<steps>_ig<scale>`.
In the workdir, where eval_conditional writes them, the last measurement of a pair overwrites the
earlier one; each JSON's conditions_from names the images it was measured on.
"""

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import,wrong-import-position

SCORES = {'low_res': 'psnr', 'masked_image': 'masked_psnr'}  # condition key -> the score to choose by


def label(steps: int, scale: float) -> str:
  """The key of one (DDIM steps, image guidance scale) measurement in the results."""
  return f'ddim{steps}_ig{scale:g}'


def measure(config, workdir: str, steps: int, scale: float, eval_path: str, num_images: int,
            keep_in: Path) -> dict:
  """eval_conditional at `steps` DDIM steps and image guidance `scale` on the first `num_images` images
  of `eval_path`: its results. Its JSON and grid are also copied to `keep_in`, where no later
  measurement overwrites them."""
  from latent_diffusion import main  # pylint: disable=g-import-not-at-top
  from latent_diffusion.evaluate import conditional  # pylint: disable=g-import-not-at-top
  with config.unlocked():
    config.mode, config.sample.num_steps, config.sample.image_guidance_scale = 'eval_conditional', steps, scale
    config.data.eval_path, config.eval.num_images = eval_path, num_images
  main.run(config, workdir)
  name = conditional.result_name(config)
  written = Path(workdir) / 'diffusion' / f'{name}.json'
  keep_in.mkdir(parents=True, exist_ok=True)
  for path in (written, written.parent / 'samples' / f'{name}.png'):
    shutil.copyfile(path, keep_in / path.name)
  return json.loads(written.read_text())


def sweep(config, workdir: str, steps, selection_path: str, selection_images: int, out: Path,
          report_steps=None, scales=None) -> dict:
  """{'chosen', 'chosen_steps', 'chosen_image_guidance_scale', 'score', 'selection': {label: results},
  'eval': {label: results}, ...}, also in <out>/results.json. Every pair of `steps` and `scales`
  (default: the config's sample.image_guidance_scale) is measured on the selection images. The eval
  split measures `report_steps` (default: the config's sample.num_steps) at the config's scale before
  the selection, and the chosen pair after it."""
  key = config.cond_stage.key
  if key not in SCORES:
    raise ValueError(f'cond_stage.key is {key!r}: the step sweep is for super-resolution and inpainting '
                     f'({", ".join(SCORES)})')
  if config.sample.sampler != 'ddim':
    raise ValueError(f'sample.sampler is {config.sample.sampler!r}: the step sweep is for ddim')
  eval_path, eval_images, score = config.data.eval_path, config.eval.num_images, SCORES[key]
  config_scale = config.sample.image_guidance_scale
  report = [(count, config_scale) for count in ([config.sample.num_steps] if report_steps is None else report_steps)]
  pairs = [(count, scale) for count in steps for scale in ([config_scale] if scales is None else scales)]
  single = lambda results: results['ldm'][score]['mean']
  held_out = {label(*pair): measure(config, workdir, *pair, eval_path, eval_images, out / 'eval') for pair in report}
  selection = {label(*pair): measure(config, workdir, *pair, selection_path, selection_images, out / 'selection')
               for pair in pairs}
  chosen_pair = max(pairs, key=lambda pair: single(selection[label(*pair)]))
  chosen = label(*chosen_pair)
  if chosen not in held_out:
    held_out[chosen] = measure(config, workdir, *chosen_pair, eval_path, eval_images, out / 'eval')
  results = {'workdir': str(workdir), 'score': score, 'selection_path': selection_path,
             'selection_images': selection_images, 'eval_path': eval_path, 'eval_images': eval_images,
             'chosen': chosen, 'chosen_steps': chosen_pair[0], 'chosen_image_guidance_scale': chosen_pair[1],
             'selection': selection, 'eval': held_out}
  (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
  for split, runs in (('selection', selection), ('eval', held_out)):
    for name, run in runs.items():
      print(f'{split:9s} {name:14s} {score} ldm {single(run):.2f}'
            + ''.join(f'  {other} {value[score]["mean"]:.2f}' for other, value in run.items()
                      if isinstance(value, dict) and score in value and other != 'ldm')
            + ('  <- chosen' if name == chosen else ''), flush=True)
  return results


def main(argv):
  del argv
  numbers = lambda text, kind: [kind(value) for value in text.split(',') if value]
  report = None if flags.FLAGS.report_steps is None else numbers(flags.FLAGS.report_steps, int)
  scales = None if flags.FLAGS.image_guidance_scales is None else numbers(flags.FLAGS.image_guidance_scales, float)
  sweep(flags.FLAGS.config, flags.FLAGS.workdir, numbers(flags.FLAGS.steps, int), flags.FLAGS.selection_path,
        flags.FLAGS.selection_images, Path(flags.FLAGS.out), report, scales)


if __name__ == '__main__':
  # main.run measures each count; its module defines --config (locked) and --workdir, which absl lets
  # no other module define again.
  import latent_diffusion.main  # pylint: disable=g-import-not-at-top,unused-import
  flags.DEFINE_string('out', None, 'where results.json goes')
  flags.DEFINE_string('steps', '5,10,25,50', 'DDIM step counts to choose from, comma-separated')
  flags.DEFINE_string('selection_path', None, 'image folder to choose the step count and scale on (training images)')
  flags.DEFINE_integer('selection_images', 64, 'how many of its images (the first ones, in file order)')
  flags.DEFINE_string('image_guidance_scales', None,
                      'sample.image_guidance_scale values to choose from, comma-separated (default: the config\'s)')
  flags.DEFINE_string('report_steps', None, 'counts also measured held out, at the config\'s scale '
                      '(default: sample.num_steps)')
  flags.mark_flags_as_required(['config', 'workdir', 'out', 'selection_path'])
  app.run(main)
