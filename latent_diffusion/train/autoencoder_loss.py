"""The paper's first-stage objective: LPIPSWithDiscriminator (kl) and VQLPIPSWithDiscriminator (vq).

Generator loss  = nll + reg_weight * reg + d_weight * disc_factor * g_loss, where
  rec     = |x - x_rec| (or squared) + perceptual_weight * LPIPS(x, x_rec) per pixel,
  nll     = kl: sum(rec / exp(logvar) + logvar) / batch;  vq: mean(rec),
  reg     = kl: sum(KL) / batch (weight kl_weight);  vq: codebook loss (weight codebook_weight),
  g_loss  = -mean(D(x_rec)),
  d_weight = disc_weight * clip(|dnll/dW| / (|dg_loss/dW| + 1e-4), 0, 1e4), W = decoder.conv_out.
Discriminator loss = disc_factor * hinge (or vanilla) loss of D(x) and D(sg[x_rec]).
Both GAN terms are off (weight 0) before `disc_start`, as the paper's adopt_weight.

`generator_and_discriminator_grads` computes all of it with one autoencoder forward and one
backward: the gradients of nll and g_loss with respect to the reconstruction give both the
adaptive weight (through conv_out's input) and the cotangent pulled back through the
autoencoder. The discriminator step uses the reconstructions of this step's autoencoder
parameters (the paper's second optimizer pass recomputes them after the autoencoder update).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from latent_diffusion.diffusion.process import elementwise_loss


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}


def conv_kernel_grad(conv_input, output_grad, kernel_shape):
  """d loss / d kernel of a stride-1 'same' conv (the decoder's conv_out) from its input (B,H,W,Cin)
  and d loss / d output (B,H,W,Cout). -> kernel_shape (kh,kw,Cin,Cout)."""
  kh, kw = kernel_shape[:2]
  padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
  conv = lambda kernel: jax.lax.conv_general_dilated(
      conv_input.astype(jnp.float32), kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  _, pullback = jax.vjp(conv, jnp.zeros(kernel_shape, jnp.float32))
  return pullback(output_grad.astype(jnp.float32))[0]


def adaptive_weight(nll_grad, g_grad, disc_weight):
  """The paper's calculate_adaptive_weight: balance the GAN gradient against the nll gradient."""
  ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4)) * disc_weight


def nll_loss(images, reconstructions, logvar, kind, loss_config, perceptual_fn):
  """(nll, metrics): the pixel + perceptual reconstruction term of the kl or vq objective."""
  pixel = elementwise_loss(reconstructions, images, loss_config.pixel_loss)  # (B,H,W,C)
  if loss_config.perceptual_weight > 0:
    perceptual = perceptual_fn(images, reconstructions)  # (B,)
  else:
    perceptual = jnp.zeros(images.shape[:1], jnp.float32)
  rec = pixel + loss_config.perceptual_weight * perceptual[:, None, None, None]
  if kind == 'kl':
    nll = jnp.sum(rec / jnp.exp(logvar) + logvar) / images.shape[0]
  else:
    nll = jnp.mean(rec)
  return nll, {'rec_loss': jnp.mean(rec), 'pixel_loss': jnp.mean(pixel), 'p_loss': jnp.mean(perceptual)}


def generator_and_discriminator_grads(
    *, forward: Callable, model_params, logvar, disc_params, disc_state, images, step, kind: str,
    loss_config, perceptual_fn: Callable | None, disc_apply: Callable, use_gan: bool = True):
  """Gradients of both objectives at one batch.

  Args:
    forward: model_params -> ((reconstructions, reg), (conv_out_input, conv_out_kernel_shape, aux)),
      reg being the KL (kl) or codebook loss (vq) before its weight.
    logvar: the kl output log-variance (a scalar array; ignored for vq).
    disc_params, disc_state: discriminator parameters and its mutable state (BatchNorm statistics).
    step: the global step (int32 array) that disc_start is compared with.
    perceptual_fn: (images, reconstructions) -> LPIPS per image (B,).
    disc_apply: (disc_params, disc_state, images) -> (patch logits, new disc_state), train mode.
    use_gan: False when disc_start lies beyond the run: the GAN branch is then not even compiled.

  Returns:
    (grads {'autoencoder', 'logvar', 'discriminator'} (the train state's params layout), new disc_state,
     loss, metrics, reconstructions, aux)
  """
  (reconstructions, reg), pullback, (conv_out_input, kernel_shape, aux) = jax.vjp(
      forward, model_params, has_aux=True)
  (nll, metrics), (nll_rec_grad, logvar_grad) = jax.value_and_grad(
      lambda rec, lv: nll_loss(images, rec, lv, kind, loss_config, perceptual_fn),
      argnums=(0, 1), has_aux=True)(reconstructions, logvar)

  def with_gan(_):
    def generator_loss(rec):
      logits_fake, state = disc_apply(disc_params, disc_state, rec)
      return -jnp.mean(logits_fake), state

    (g_loss, state), g_rec_grad = jax.value_and_grad(generator_loss, has_aux=True)(reconstructions)
    if loss_config.disc_factor > 0:
      d_weight = adaptive_weight(conv_kernel_grad(conv_out_input, nll_rec_grad, kernel_shape),
                                 conv_kernel_grad(conv_out_input, g_rec_grad, kernel_shape),
                                 loss_config.disc_weight)
    else:
      d_weight = jnp.zeros((), jnp.float32)

    def discriminator_loss(params):
      logits_real, new_state = disc_apply(params, state, images)
      logits_fake, new_state = disc_apply(params, new_state, jax.lax.stop_gradient(reconstructions))
      loss = loss_config.disc_factor * D_LOSSES[loss_config.disc_loss](logits_real, logits_fake)
      return loss, (new_state, jnp.mean(logits_real), jnp.mean(logits_fake))

    (d_loss, (state, logits_real, logits_fake)), disc_grads = jax.value_and_grad(
        discriminator_loss, has_aux=True)(disc_params)
    gan_scale = d_weight * loss_config.disc_factor
    return (gan_scale * g_rec_grad, disc_grads, state,
            {'g_loss': g_loss, 'd_weight': d_weight, 'disc_factor': jnp.float32(loss_config.disc_factor),
             'disc_loss': d_loss, 'logits_real': logits_real, 'logits_fake': logits_fake,
             'gan_term': gan_scale * g_loss})

  def without_gan(_):
    zero = jnp.zeros((), jnp.float32)
    return (jnp.zeros_like(reconstructions), jax.tree.map(jnp.zeros_like, disc_params), disc_state,
            {'g_loss': zero, 'd_weight': zero, 'disc_factor': zero, 'disc_loss': zero,
             'logits_real': zero, 'logits_fake': zero, 'gan_term': zero})

  if use_gan:
    gan_rec_grad, disc_grads, disc_state, gan_metrics = jax.lax.cond(
        step >= loss_config.disc_start, with_gan, without_gan, None)
  else:
    gan_rec_grad, disc_grads, disc_state, gan_metrics = without_gan(None)
  reg_weight = loss_config.kl_weight if kind == 'kl' else loss_config.codebook_weight
  (model_grads,) = pullback((nll_rec_grad + gan_rec_grad, jnp.asarray(reg_weight, reg.dtype)))
  loss = nll + reg_weight * reg + gan_metrics.pop('gan_term')
  metrics.update(gan_metrics, loss=loss, nll_loss=nll,
                 **({'kl_loss': reg, 'logvar': logvar} if kind == 'kl' else {'quant_loss': reg}))
  grads = {'autoencoder': model_grads, 'logvar': logvar_grad, 'discriminator': disc_grads}
  return grads, disc_state, loss, metrics, reconstructions, aux
