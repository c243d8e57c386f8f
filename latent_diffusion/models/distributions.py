"""The stage-1 posterior: a diagonal Gaussian over latents (NHWC)."""

import jax
import jax.numpy as jnp


class DiagonalGaussian:
  """q(z|x) with mean and log-variance split from the encoder's moments on the channel axis.

  Mirrors the paper's DiagonalGaussianDistribution: logvar clipped to [-30, 20], KL to a
  standard normal summed over H, W and C.
  """

  def __init__(self, moments: jax.Array):
    self.mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    self.logvar = jnp.clip(logvar, -30.0, 20.0)
    self.std = jnp.exp(0.5 * self.logvar)
    self.var = jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per example. (B,)"""
    return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))

  def nll(self, sample: jax.Array) -> jax.Array:
    """Negative log-likelihood of `sample` per example. (B,)"""
    log_two_pi = jnp.log(2.0 * jnp.pi)
    return 0.5 * jnp.sum(log_two_pi + self.logvar + (sample - self.mean) ** 2 / self.var,
                         axis=(1, 2, 3))
