"""Guidance as wrappers that turn a denoiser into a sampler's `model_fn(x_t, t)`: classifier-free guidance
(Ho & Salimans 2021) and the paper's image-space guidance towards a measurement (super-resolution,
inpainting)."""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from latent_diffusion.diffusion import process

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


def image_guidance(model_fn, schedule, parameterization: str, residual_fn, scale: float):
  """The paper's image-space guider (LDM, appendix C, used for its guided super-resolution): a
  sampler's model_fn(x, t) whose noise prediction is pushed towards latents whose decoded clean
  estimate agrees with a measurement,

      eps <- eps + scale * sqrt(1 - a_t) * grad_{x_t} 1/2 ||residual_fn(x0(x_t))||^2,

  i.e. eps - sqrt(1 - a_t) grad log p(y | x_t) with log p(y | x_t) = -scale/2 ||T(D(x0(x_t))) - y||^2.
  `residual_fn(x0)` maps the predicted clean latents (B, h, w, c) to T(D(x0)) - y (B, ...): for
  super-resolution the decoded image downsampled minus the low-resolution input, for inpainting the
  decoded image minus the known pixels, outside the hole. Samples are independent, so the gradient of
  the batch's summed loss is each sample's own. The output is returned in `parameterization`'s units
  (float32); every sampler can take it.
  """
  def model_fn_guided(x, t):
    def loss(x):
      output = model_fn(x, t).astype(jnp.float32)
      eps, x0 = process.eps_and_x0(schedule, parameterization, x, t, output)
      return 0.5 * jnp.sum(jnp.square(residual_fn(x0))), eps
    grad, eps = jax.grad(loss, has_aux=True)(x.astype(jnp.float32))
    eps = eps + scale * process.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.ndim) * grad
    if parameterization == 'eps':
      return eps
    x0 = process.predict_x0_from_eps(schedule, x, t, eps)
    return x0 if parameterization == 'x0' else process.v_target(schedule, x0, eps, t)
  return model_fn_guided
