"""Sampler comparison: sample quality against sampler steps for DDIM, PLMS and DPM-Solver++(2M) on one
trained model (eval_diffusion for each pair), with a plot.

  python experiments/samplers.py --config=configs/utkface64_f4.py --workdir=W --out=experiments/results/samplers \
      --config.eval.feature_network=classifier --config.eval.classifier_path=utk.msgpack \
      --config.eval.num_samples=500 --steps=10,25,50,100,200 --samplers=ddim,plms,dpm_solver

Every --config.* override is a field of the model's config (configs/base.py), as for
`python -m latent_diffusion.main`. It writes <out>/results.json (the FD/FID, IS, KID, precision and
recall of each pair, with its samples/s) and <out>/fd_vs_steps.png. The samples of each pair stay in
the workdir (eval_diffusion: a run started again skips what is written).
"""

import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import,wrong-import-position

SAMPLERS = ('ddim', 'plms', 'dpm_solver')


def compare(config, workdir: str, samplers, steps, out: Path) -> dict:
  """{'runs': [{'sampler', 'num_steps', <metrics>, 'samples_per_second'}, ...]} written to <out>."""
  from latent_diffusion import main  # pylint: disable=g-import-not-at-top
  out.mkdir(parents=True, exist_ok=True)
  runs = []
  for sampler in samplers:
    for count in steps:
      with config.unlocked():
        config.mode, config.sample.sampler, config.sample.num_steps = 'eval_diffusion', sampler, count
      start = time.time()
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # FewSamplesWarning for small N; scipy's singular-matrix note
        main.run(config, workdir)
      results = json.loads((Path(workdir) / 'diffusion' / 'eval.json').read_text())
      runs.append({'sampler': sampler, 'num_steps': count, 'seconds': round(time.time() - start, 1),
                   'samples_per_second': results['sampling']['images_per_second'],
                   **{k: v for k, v in results.items() if k not in ('sampling', 'sampler', 'num_steps')}})
      print(json.dumps(runs[-1]), flush=True)
  results = {'workdir': str(workdir), 'runs': runs}
  (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
  plot(results, out / 'fd_vs_steps.png')
  return results


def distance_name(run: dict) -> str:
  return next(name for name in run if name == 'FID' or name.startswith('FD-'))


def plot(results: dict, path: Path) -> Path:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axis = plt.subplots(figsize=(5, 3.5))
  name = distance_name(results['runs'][0])
  for sampler in dict.fromkeys(run['sampler'] for run in results['runs']):
    runs = sorted((run for run in results['runs'] if run['sampler'] == sampler), key=lambda run: run['num_steps'])
    axis.plot([run['num_steps'] for run in runs], [run[name] for run in runs], marker='o', label=sampler)
  axis.set(xscale='log', xlabel='sampler steps', ylabel=name, title='sample quality vs sampler steps')
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


if __name__ == '__main__':
  # main.run is what runs each pair; its module defines --config (locked) and --workdir, which absl
  # lets no other module define again.
  import latent_diffusion.main  # pylint: disable=g-import-not-at-top,unused-import
  flags.mark_flag_as_required('workdir')
  flags.DEFINE_string('out', None, 'Where to write results.json and the plot.', required=True)
  flags.DEFINE_list('samplers', list(SAMPLERS), 'Samplers to compare.')
  flags.DEFINE_list('steps', ['10', '25', '50', '100', '200'], 'Sampler steps.')

  def _main(argv):
    del argv
    unknown = set(flags.FLAGS.samplers) - set(SAMPLERS)
    if unknown:
      raise app.UsageError(f'--samplers: unknown {sorted(unknown)}; expected some of {", ".join(SAMPLERS)}')
    compare(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.samplers, [int(s) for s in flags.FLAGS.steps],
            Path(flags.FLAGS.out))

  app.run(_main)
