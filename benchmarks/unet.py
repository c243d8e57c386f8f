"""U-Net forward and full training step (forward, backward, AdamW, EMA): ours vs diffusers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import timing
from latent_diffusion.train import diffusion


def latent_input(config, batch: int, seed: int = 0) -> np.ndarray:
  h, w, c = diffusion.latent_shape(config)
  return np.random.default_rng(seed).normal(size=(batch, h, w, c)).astype(np.float32)


def torch_unet(config) -> torch.nn.Module:
  from benchmarks import reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  return reference.diffusers_unet(diffusion.unet_kwargs(config))


def forward(config, batch: int, repeats: int, with_reference: bool = True) -> dict:
  """One U-Net evaluation on a batch of latents (no gradient)."""
  unet = diffusion.build_unet(config)
  x = jnp.asarray(latent_input(config, batch))
  t = jnp.full((batch,), 500, jnp.int32)
  params = timing.random_params(unet.init, jax.random.PRNGKey(0), x[:1], t[:1])
  apply = jax.jit(unet.apply)
  ours = timing.measure(lambda: jax.block_until_ready(apply(params, x, t)), repeats)
  if not with_reference:
    return timing.compared(ours, None)
  module = torch_unet(config)
  x_torch = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
  t_torch = torch.from_numpy(np.array(t))
  with torch.no_grad():
    theirs = timing.measure(lambda: module(x_torch, t_torch), repeats)
  row = timing.compared(ours, theirs)
  # The torch weights run in ours give the torch output: both sides are the same function.
  from benchmarks import reference  # pylint: disable=g-import-not-at-top
  row['max_abs_difference'] = reference.unet_output_difference(module, diffusion.unet_kwargs(config),
                                                                x.shape[1])
  return row


def train_step_program(config, batch: int):
  """(jitted step(state, batch) of train/diffusion.train_step, initial state, a batch of fixed KL
  moments): the stage-2 training step as the training loop runs it."""
  model = diffusion.build_denoiser(config)
  tx = diffusion.make_optimizer(config.diffusion_train)
  params = timing.random_params(functools.partial(diffusion.init_params, model, config), jax.random.PRNGKey(0))
  state = diffusion.state_from_params(params, tx, jax.random.PRNGKey(1))  # nothing to compile but the step
  step_fn = jax.jit(functools.partial(
      diffusion.train_step, model=model, tx=tx, schedule=diffusion.schedule_from_config(config),
      objective=diffusion.Objective.from_config(config), base_ema_decay=config.diffusion_train.ema_decay,
      deterministic=True), donate_argnums=0)
  mean = latent_input(config, batch)
  moments = {'moments': jnp.asarray(np.concatenate([mean, np.full_like(mean, -2.0)], axis=-1))}
  return step_fn, state, moments


def our_train_step(config, batch: int):
  """A blocking step() running train_step_program on its own state."""
  step_fn, state, moments = train_step_program(config, batch)
  holder = [state]

  def step():
    holder[0], metrics = step_fn(holder[0], moments)
    jax.block_until_ready(metrics['loss'])
  return step


def torch_train_step(config, batch: int):
  """The same step in PyTorch: posterior sample, q_sample, U-Net, the config's loss, backward,
  AdamW (the config's settings) and an EMA update of every parameter."""
  module = torch_unet(config).train()
  train = config.diffusion_train
  optimizer = torch.optim.AdamW(module.parameters(), lr=train.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=train.weight_decay)
  ema = [p.detach().clone() for p in module.parameters()]
  alphas_cumprod = torch.from_numpy(np.asarray(diffusion.schedule_from_config(config).alphas_cumprod,
                                               np.float32))
  mean = torch.from_numpy(latent_input(config, batch)).permute(0, 3, 1, 2).contiguous()
  std = torch.full_like(mean, float(np.exp(-1.0)))
  loss_fn = torch.nn.functional.l1_loss if config.diffusion.loss_type == 'l1' else torch.nn.functional.mse_loss
  params = list(module.parameters())

  def step():
    latents = mean + std * torch.randn_like(mean)
    t = torch.randint(0, len(alphas_cumprod), (batch,))
    noise = torch.randn_like(latents)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    loss = loss_fn(module(x_t, t).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1 - train.ema_decay)  # pylint: disable=protected-access
  return step


def train_step(config, batch: int, repeats: int, with_reference: bool = True) -> dict:
  ours = timing.measure(our_train_step(config, batch), repeats)
  theirs = timing.measure(torch_train_step(config, batch), repeats) if with_reference else None
  return timing.compared(ours, theirs)
