"""Evaluation: reconstruction metrics of stage 1 (autoencoder), and the measures of whether
conditional samples obey their conditions (shapes_parser, adherence, classifier).

The names below are those of the former `latent_diffusion/evaluate.py`, kept importable as
`evaluate.<name>` for train/autoencoder.py and main.py.
"""

from latent_diffusion.evaluate.autoencoder import Evaluator
from latent_diffusion.evaluate.autoencoder import describe
from latent_diffusion.evaluate.autoencoder import eval_data_config
from latent_diffusion.evaluate.autoencoder import evaluate_autoencoder
from latent_diffusion.evaluate.autoencoder import has_eval_split
from latent_diffusion.evaluate.autoencoder import image_metrics

__all__ = ('Evaluator', 'describe', 'eval_data_config', 'evaluate_autoencoder', 'has_eval_split',
           'image_metrics')
