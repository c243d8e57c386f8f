"""The input pipeline's images/s (decode, crop, resize, flip, [masks], batch) on a real image folder.

  python -m benchmarks.input_pipeline --config=configs/utkface_inpaint.py \
      --path=../shared/data/utkface200/train --image_size=256 --batches=8 --repeats=3

runs one config's pipeline alone (its augmentations, masks or low-resolution inputs included) and
prints the median images/s over the repeats as JSON; `python -m benchmarks.run` measures the
Churches pipeline beside the other benchmarks.
"""

import argparse
import json
import statistics
import time

from latent_diffusion.data import pipeline


def images_per_second(data_config, batch: int, num_batches: int) -> dict:
  """Images/s over `num_batches` batches after the first (which starts the workers)."""
  iterator = pipeline.make_iterator(data_config, batch_size=batch, seed=0)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return {'images': batch * num_batches, 'seconds': seconds, 'images_per_s': batch * num_batches / seconds,
          'source': data_config.source, 'path': data_config.path, 'image_size': data_config.image_size,
          'worker_count': data_config.worker_count}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='a config file, e.g. configs/utkface_inpaint.py')
  parser.add_argument('--path', help='an image folder in place of the config data.path')
  parser.add_argument('--image_size', type=int, help='in place of the config data.image_size')
  parser.add_argument('--worker_count', type=int, default=0)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)
  from benchmarks.run import load_config  # pylint: disable=g-import-not-at-top
  data_config = load_config(args.config).data
  if args.path:
    data_config.source, data_config.path = 'folder', args.path
  if args.image_size:
    data_config.image_size = args.image_size
  data_config.worker_count = args.worker_count
  runs = [images_per_second(data_config, args.batch, args.batches) for _ in range(args.repeats)]
  rates = [run['images_per_s'] for run in runs]
  described = {key: value for key, value in runs[0].items() if key not in ('images', 'seconds')}
  print(json.dumps(dict(described, config=args.config, batch=args.batch, batches=args.batches,
                        images_per_s=statistics.median(rates), images_per_s_runs=rates)))


if __name__ == '__main__':
  main()
