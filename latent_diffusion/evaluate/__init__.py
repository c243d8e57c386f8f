"""Evaluation: reconstruction metrics of stage 1 (autoencoder.py), and whether conditional samples obey
their conditions (shapes_parser.py, adherence.py, classifier.py).

The names of the former `latent_diffusion/evaluate.py` stay importable from here (`evaluate.Evaluator`,
as train/autoencoder.py and main.py use them). They load on first use, so that importing a sibling
module (adherence needs only numpy) does not import the training code and dm_pix.
"""

import importlib

_AUTOENCODER_NAMES = ('Evaluator', 'describe', 'eval_data_config', 'evaluate_autoencoder', 'has_eval_split',
                      'image_metrics')

__all__ = _AUTOENCODER_NAMES


def __getattr__(name):
  if name in _AUTOENCODER_NAMES:
    return getattr(importlib.import_module('latent_diffusion.evaluate.autoencoder'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_AUTOENCODER_NAMES))
