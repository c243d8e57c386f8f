"""User-facing errors: each carries one line that names what is wrong."""


class LatentDiffusionError(Exception):
  """Base class; main.py prints the message as one line and exits 2."""


class ConfigError(LatentDiffusionError):
  """A config field has a bad value or does not exist."""


class DataError(LatentDiffusionError):
  """A data path is missing, holds no images, or a source cannot be read."""


class CheckpointError(LatentDiffusionError):
  """A checkpoint does not match the config or cannot be restored."""


class TrainingError(LatentDiffusionError):
  """Training cannot go on, e.g. too many consecutive non-finite losses or gradients."""


class Preempted(Exception):
  """Not an error: a preemption notice (SIGTERM) arrived and a checkpoint was saved. main.py exits 0."""

  def __init__(self, stage: str, step: int):
    super().__init__(f'{stage}: preempted; saved a checkpoint at step {step}')
    self.stage, self.step = stage, step
