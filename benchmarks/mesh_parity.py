"""Both training stages on 1 CPU device and on 8 (data=4 x fsdp=2, XLA_FLAGS forces 8 host
devices), same config and data: the per-step loss differences and each mesh's training speed
(median steps/s after the first, compiling, step), as JSON.

  python benchmarks/mesh_parity.py --steps=6 --out=benchmarks/results/mesh_parity.json

Runs `python -m latent_diffusion.main` on tests/tiny_config.py in two fresh processes.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / 'tests'))
sys.path.insert(0, str(REPO_ROOT))

import kill_loop  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position

MESHES = {'1 device': ({}, ''),
          '8 devices (data=4, fsdp=2)': ({'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.fsdp_min_size': 4096},
                                         ' --xla_force_host_platform_device_count=8')}


def run(workdir, steps, overrides, extra_flags):
  flags = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
           + extra_flags).strip()
  command = kill_loop.main_command(workdir, 'train', {  # one checkpoint per stage, at its end
      'autoencoder_train.num_steps': steps, 'diffusion_train.num_steps': steps,
      'autoencoder_train.checkpoint_every_steps': steps, 'diffusion_train.checkpoint_every_steps': steps,
      **overrides})
  subprocess.run(command, cwd=REPO_ROOT, env=kill_loop.subprocess_env({'XLA_FLAGS': flags}), check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  losses, speeds = {}, {}
  for stage in ('autoencoder', 'diffusion'):
    records = [json.loads(line) for line in (Path(workdir) / stage / 'metrics.jsonl').read_text().splitlines()]
    losses[stage] = {record['step']: record['loss'] for record in records}
    speeds[stage] = statistics.median(record['steps_per_second'] for record in records[1:])
  return losses, speeds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    runs = {name: run(Path(tmp) / str(i), args.steps, *mesh) for i, (name, mesh) in enumerate(MESHES.items())}
  one, eight = (losses for losses, _ in runs.values())
  report = {'steps': args.steps, 'config': 'tests/tiny_config.py', 'stages': {},
            'steps_per_second': {name: speeds for name, (_, speeds) in runs.items()}}
  for stage in one:
    rows = [{'step': s, 'loss_1': one[stage][s], 'loss_8': eight[stage][s],
             'abs_diff': abs(one[stage][s] - eight[stage][s]),
             'rel_diff': abs(one[stage][s] - eight[stage][s]) / abs(one[stage][s])} for s in sorted(one[stage])]
    report['stages'][stage] = {'max_rel_diff': max(r['rel_diff'] for r in rows),
                               'step1_rel_diff': rows[0]['rel_diff'], 'per_step': rows}
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    Path(args.out).write_text(text + '\n')


if __name__ == '__main__':
  main()
