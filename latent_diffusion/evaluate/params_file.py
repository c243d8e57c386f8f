"""Variables of the evaluation networks (shapes parser, classifier) in one msgpack file each
(flax.serialization): small, no orbax directory, one path to pass around.

A file is read back against the variables the network would be built with: a missing file, bytes that
are not msgpack, or a tree whose names or shapes differ raise CheckpointError naming the path.
"""

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization
from flax import traverse_util

from latent_diffusion.errors import CheckpointError


def save(path: str | Path, variables: Any) -> Path:
  """Writes `variables` (a nested dict of arrays) as msgpack to `path`, creating its folder."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  state = serialization.to_state_dict(jax.device_get(variables))
  path.write_bytes(serialization.msgpack_serialize(state))
  return path


def load(path: str | Path, abstract_variables: Any, what: str) -> Any:
  """The variables stored at `path`, as numpy arrays, checked against `abstract_variables` (a tree of
  ShapeDtypeStructs, e.g. from jax.eval_shape(model.init, ...)); `what` names the network in errors."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f'{what}: no file at {path}')
  try:
    state = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{what}: {path} is not a msgpack parameter file ({type(e).__name__})') from None
  if not isinstance(state, dict):
    raise CheckpointError(f'{what}: {path} does not hold a dict of parameters')
  expected = traverse_util.flatten_dict(serialization.to_state_dict(abstract_variables), sep='/')
  found = traverse_util.flatten_dict(state, sep='/')
  missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
  if missing or unexpected:
    raise CheckpointError(f'{what}: {path} does not match the network: missing {missing[:5]}, '
                          f'unexpected {unexpected[:5]}')
  for name, leaf in expected.items():
    if np.shape(found[name]) != tuple(leaf.shape):
      raise CheckpointError(f'{what}: {path}: parameter {name} has shape {np.shape(found[name])}, '
                            f'the network needs {tuple(leaf.shape)}')
  restored = {name: np.asarray(found[name], leaf.dtype) for name, leaf in expected.items()}
  return serialization.from_state_dict(abstract_variables, traverse_util.unflatten_dict(restored, sep='/'))
