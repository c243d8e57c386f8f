"""A small ResNet classifier of labelled image folders (CIFAR-10 classes, UTKFace race), trained by our
input pipeline: it measures whether class-conditional samples show their class (predict) and gives
the features (penultimate layer) on which a Frechet distance of samples is computed.

Network: images larger than 32 px are average-pooled to about 32 px (64x64 faces by 2x2), a stride-2
3x3 stem, then three stages of one residual block each (BatchNorm, ReLU; widths 32, 64, 128 at 1/2,
1/4, 1/8 of 32 px), global average pooling -> features (N, 128) -> linear head; 0.3 M parameters.
A full-resolution first stage costs ~5x the CPU time per step: on a GPU, each at the steps the 2-core
CPU runs in ~6 min, it reached 58% on CIFAR-10 (410 steps) against 68-73% for this layout (2000 steps).

Measured with the CLI defaults (1500 steps of 64, SGD peaking at 0.4) on the shared 2-core CPU:
CIFAR-10 70.8% of the 2,000 test images (165 s of training, 3 min for the whole command); UTKFace-64
race 80.2% of the 1,000 val images (167 s; the commonest race is 52.5% of them). 2000 steps gave
70.9% and 80.8% (474 s and 462 s on a more loaded machine).

Variables are {'params', 'batch_stats'}; predict and features use the running batch statistics.

  python -m latent_diffusion.evaluate.classifier --data=cifar10 --out=/tmp/cifar10.msgpack
"""

import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from latent_diffusion.data import pipeline
from latent_diffusion.errors import CheckpointError, ConfigError, DataError
from latent_diffusion.evaluate import batching, params_file

WIDTHS = (32, 64, 128)
INPUT_SIDE = 32  # larger inputs are average-pooled to about this side
_EVAL_BATCH = 250


class ResidualBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus the input (projected by a strided 1x1 conv where the shape changes)."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.features, (3, 3), strides=self.stride, use_bias=False, name='conv1')(x)
    y = nn.relu(norm('norm1')(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name='conv2')(y)
    y = norm('norm2')(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), strides=self.stride, use_bias=False, name='shortcut')(x)
      x = norm('shortcut_norm')(x)
    return nn.relu(x + y)


class Classifier(nn.Module):
  """images (N, S, S, 3) in [-1, 1] -> (logits (N, num_classes), features (N, widths[-1]))."""
  num_classes: int
  widths: tuple[int, ...] = WIDTHS

  @nn.compact
  def __call__(self, images, train: bool = False):
    factor = images.shape[1] // INPUT_SIDE
    if factor > 1:  # larger images are averaged down to about INPUT_SIDE first
      images = nn.avg_pool(images, (factor, factor), strides=(factor, factor))
    x = nn.Conv(self.widths[0], (3, 3), strides=2, use_bias=False, name='stem')(images)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='stem_norm')(x))
    for stage, features in enumerate(self.widths):
      x = ResidualBlock(features, stride=1 if stage == 0 else 2, name=f'stage_{stage}')(x, train)
    features = jnp.mean(x, axis=(1, 2))  # (N, widths[-1])
    return nn.Dense(self.num_classes, name='head')(features), features


def abstract_variables(num_classes: int, image_size: int = INPUT_SIDE):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(Classifier(num_classes).init, jax.random.key(0), images)


def num_classes_of(variables) -> int:
  return int(variables['params']['head']['kernel'].shape[-1])


# ---------------------------------------------------------------------------------------------------
# Training


def _check_data_config(data_config):
  if data_config.source != 'folder':
    raise ConfigError(f"data.source must be 'folder' for a classifier (its held-out split is a folder), "
                      f'got {data_config.source!r}')
  if data_config.num_classes <= 0:
    raise ConfigError(f'data.num_classes must be positive for a classifier, got {data_config.num_classes}')
  if not data_config.label_column:
    raise ConfigError("data.label_column: '' means no labels; a classifier needs them")


def eval_batches(data_config, eval_path: str, batch_size: int = _EVAL_BATCH):
  """(images, labels) numpy batches of the folder at eval_path, in order, unflipped."""
  eval_config = data_config.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.path, eval_config.flip, eval_config.crop = eval_path, False, 'center'
  iterator = pipeline.make_iterator(eval_config, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                                    drop_remainder=False)
  for batch in iterator:
    if 'label' not in batch:
      raise DataError(f'{eval_path}: images without labels (data.label_column={eval_config.label_column!r})')
    yield batch['image'], batch['label']


def held_out_accuracy(variables, data_config, eval_path: str) -> tuple[float, int]:
  """(accuracy, number of images) of predict over the folder at eval_path."""
  right = total = 0
  for images, labels in eval_batches(data_config, eval_path):
    right += int(np.sum(predict(variables, images) == labels))
    total += len(labels)
  return right / max(total, 1), total


def _make_train_step(model, optimizer):

  def loss_fn(params, batch_stats, images, labels):
    (logits, _), updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                       mutable=['batch_stats'])
    targets = optax.smooth_labels(jax.nn.one_hot(labels, model.num_classes), 0.1)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (updates['batch_stats'], accuracy)

  @jax.jit
  def train_step(variables, opt_state, images, labels):
    grads, (batch_stats, accuracy) = jax.grad(loss_fn, has_aux=True)(
        variables['params'], variables['batch_stats'], images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, variables['params'])
    params = optax.apply_updates(variables['params'], updates)
    return {'params': params, 'batch_stats': batch_stats}, opt_state, accuracy

  return train_step


def train_classifier(data_config, eval_path: str, steps: int, batch_size: int, seed: int,
                     learning_rate: float = 0.4, weight_decay: float = 5e-4,
                     log_every: int = 0) -> tuple[dict, dict]:
  """Trains a classifier from scratch on `steps` batches of data_config's folder (the pipeline's
  shuffling and flips), SGD with Nesterov momentum, a linear warmup over the first 10% then a linear
  decay to 0, label smoothing 0.1.

  Args:
    data_config: a `config.data` ConfigDict (source 'folder', path, image_size, label_column,
      num_classes).
    eval_path: the held-out image folder, labelled the same way.

  Returns:
    (variables, metrics): metrics holds accuracy (held out), num_eval_images, train_accuracy (mean
    over the last 50 steps), steps and train_seconds (the training loop, compilation included).
  """
  _check_data_config(data_config)
  if steps <= 0 or batch_size <= 0:
    raise ValueError(f'steps and batch_size must be positive, got {steps} and {batch_size}')
  num_classes, size = int(data_config.num_classes), int(data_config.image_size)
  model = Classifier(num_classes)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))  # eager init is slow
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, max(1, steps // 10)),
       optax.linear_schedule(learning_rate, 0.0, steps - max(1, steps // 10))], [max(1, steps // 10)])
  optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, 0.9, nesterov=True))
  opt_state = optimizer.init(variables['params'])
  train_step = _make_train_step(model, optimizer)
  iterator = pipeline.make_iterator(data_config, batch_size=batch_size, seed=seed, shuffle=True)
  accuracies = []
  start = time.perf_counter()
  for step in range(steps):
    batch = next(iterator)
    if 'label' not in batch:
      raise DataError(f'{data_config.path}: images without labels (data.label_column='
                      f'{data_config.label_column!r})')
    outside = batch['label'][(batch['label'] < 0) | (batch['label'] >= num_classes)]
    if len(outside):
      raise ConfigError(f'data.num_classes={num_classes}, but {data_config.path} has label {int(outside[0])}')
    variables, opt_state, accuracy = train_step(variables, opt_state, batch['image'], batch['label'])
    accuracies.append(accuracy)
    if log_every and (step + 1) % log_every == 0:
      recent = float(np.mean(jax.device_get(accuracies[-log_every:])))
      print(f'step {step + 1}/{steps}: train accuracy {recent:.3f}'
            f' ({time.perf_counter() - start:.0f} s)', flush=True)
  variables = jax.device_get(variables)
  train_seconds = time.perf_counter() - start
  accuracy, count = held_out_accuracy(variables, data_config, eval_path)
  return variables, {'accuracy': accuracy, 'num_eval_images': count, 'steps': steps,
                     'train_accuracy': float(np.mean(jax.device_get(accuracies[-50:]))),
                     'train_seconds': train_seconds}


# ---------------------------------------------------------------------------------------------------
# Use


@jax.jit
def _apply(variables, images):
  return Classifier(num_classes_of(variables)).apply(variables, images, train=False)


def outputs(variables, images) -> tuple[np.ndarray, np.ndarray]:
  """(logits (N, num_classes), features (N, 128)) of images (N, H, W, 3) in [-1, 1], in chunks of
  _EVAL_BATCH (the last one padded when there are several: one compiled size)."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (N, H, W, 3), got shape {images.shape}')
  logits, feats = batching.map_in_batches(lambda batch: _apply(variables, batch), images, _EVAL_BATCH,
                                          pad_single=False)
  return logits.astype(np.float32), feats.astype(np.float32)


def predict(variables, images) -> np.ndarray:
  """int32 (N,) predicted class of images (N, H, W, 3) in [-1, 1]."""
  return np.argmax(outputs(variables, images)[0], axis=-1).astype(np.int32)


def features(variables, images) -> np.ndarray:
  """float32 (N, 128): the pooled penultimate features of images (N, H, W, 3) in [-1, 1]."""
  return outputs(variables, images)[1]


def save_classifier(path, variables, info: dict | None = None):
  """Writes the classifier's variables to `path` (msgpack) and `info` (e.g. {'data': 'cifar10', ...}:
  what it was trained on, read back by evaluate/features.py to name FD-<data>) to `<path>.json`."""
  path = params_file.save(path, variables)
  if info is not None:
    Path(str(path) + '.json').write_text(json.dumps(info, indent=2) + '\n')
  return path


def load_classifier(path):
  """The classifier's variables from `path` (its number of classes read from the file); CheckpointError
  naming the path if it is missing or does not hold this classifier."""
  try:
    num_classes = num_classes_of(serialization.msgpack_restore(Path(path).read_bytes()))
  except Exception:  # pylint: disable=broad-except
    num_classes = 1  # not a classifier file: params_file.load says what is wrong with it
  return params_file.load(path, abstract_variables(num_classes), 'classifier')


# ---------------------------------------------------------------------------------------------------
# Command line

DATASETS = {  # name -> (train folder, held-out folder, image_size, num_classes), under the data root
    'cifar10': ('cifar10/train', 'cifar10/test', 32, 10),  # class folders
    'utkface64': ('utkface64/train', 'utkface64/val', 64, 5),  # labels.csv column label: race 0..4
}


def dataset_config(name: str, data_root: str):
  """(config.data for the named set's training folder, its held-out folder)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  if name not in DATASETS:
    raise ConfigError(f'--data must be one of {sorted(DATASETS)}, got {name!r}')
  train, held_out, image_size, num_classes = DATASETS[name]
  data_config = base.get_config().data
  with data_config.unlocked():
    data_config.source, data_config.path = 'folder', str(Path(data_root) / train)
    data_config.image_size, data_config.num_classes = image_size, num_classes
    data_config.label_column = 'label'
    data_config.crop, data_config.flip = 'center', True
  return data_config, str(Path(data_root) / held_out)


def _main(flag_values):
  from latent_diffusion.evaluate import shapes_parser  # pylint: disable=g-import-not-at-top
  shapes_parser.use_fast_cpu_conv()
  data_config, eval_path = dataset_config(flag_values.data, flag_values.data_root)
  variables, metrics = train_classifier(data_config, eval_path, flag_values.steps, flag_values.batch_size,
                                        flag_values.seed, learning_rate=flag_values.learning_rate,
                                        log_every=flag_values.log_every)
  path = save_classifier(flag_values.out, variables, {'data': flag_values.data, **metrics})
  print(f'wrote {path}')
  print(f'{flag_values.data}: held-out accuracy {metrics["accuracy"]:.4f} on {metrics["num_eval_images"]} '
        f'images of {eval_path}; train accuracy {metrics["train_accuracy"]:.4f}; {metrics["steps"]} steps '
        f'of {flag_values.batch_size} in {metrics["train_seconds"]:.0f} s')


if __name__ == '__main__':
  # Flags are defined here, not at import, so importing this module defines none.
  import os  # pylint: disable=g-import-not-at-top
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_enum('data', None, sorted(DATASETS), 'Which labelled set.', required=True)
  flags.DEFINE_string('out', None, 'Where to write the classifier variables (msgpack).', required=True)
  flags.DEFINE_integer('steps', 1500, 'Training steps.')
  flags.DEFINE_integer('batch_size', 64, 'Images per step.')
  flags.DEFINE_integer('seed', 0, 'Seed of the initialisation and of the pipeline.')
  flags.DEFINE_float('learning_rate', 0.4, 'Peak SGD learning rate.')
  flags.DEFINE_string('data_root', os.environ.get('LDM_DATA', '../shared/data'),
                      'Folder holding cifar10/ and utkface64/ ($LDM_DATA, as the configs).')
  flags.DEFINE_integer('log_every', 100, 'Print the train accuracy every this many steps (0: never).')
  app.run(lambda argv: _main(flags.FLAGS))
