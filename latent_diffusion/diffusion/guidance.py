"""Classifier-free guidance (Ho & Salimans 2021) as a wrapper that turns a conditional denoiser into a
sampler's `model_fn(x_t, t)`."""

from typing import Any, Callable

import jax
import jax.numpy as jnp

ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def concat_batches(first, second):
  """Two pytrees of arrays joined along the batch axis 0; a batch of 1 in `first` is repeated to match."""
  def concat(a, b):
    if a.shape[0] == 1 and b.shape[0] != 1:
      a = jnp.broadcast_to(a, (b.shape[0],) + a.shape[1:])
    return jnp.concatenate([a, b.astype(a.dtype)], axis=0)
  return jax.tree.map(concat, first, second)


def classifier_free_guidance(apply_fn: ApplyFn, conditioning, unconditional,
                             scale: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """model_fn(x, t) = u + scale (c - u) of the raw outputs u (unconditional) and c (conditional).

  `apply_fn(x, t, conditioning_pytree)` is the denoiser; `conditioning` and `unconditional` are
  pytrees of the same structure with the batch on axis 0 (a leaf of `unconditional` may have batch 1,
  e.g. one empty-prompt embedding). Both halves go through ONE model call on the concatenation
  [unconditional; conditional] with x and t doubled, as the paper's samplers do. It guides the raw
  output, so it works for every parameterisation (Stable Diffusion 2 guides v). scale == 1 is plain
  conditional sampling: one call on the conditional batch only. The result is float32.
  """
  if isinstance(scale, (int, float)) and scale == 1:
    return lambda x, t: apply_fn(x, t, conditioning).astype(jnp.float32)
  both = concat_batches(unconditional, conditioning)

  def model_fn(x, t):
    out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both).astype(jnp.float32)
    out_unconditional, out_conditional = jnp.split(out, 2)
    return out_unconditional + scale * (out_conditional - out_unconditional)
  return model_fn
