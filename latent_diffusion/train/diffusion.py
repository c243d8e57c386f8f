"""Stage 2: train the denoiser (U-Net + conditioning model) on latents of the frozen stage-1 autoencoder.

The objective is the paper's LatentDiffusion.p_losses: an eps / x0 / v target, l1 or l2, with an
optional learned per-timestep log-variance and VLB term; conditions are dropped with
`diffusion.cond_drop_prob` so one model learns the conditional and the unconditional task at once.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jax.experimental import multihost_utils

from latent_diffusion import sample_inputs
from latent_diffusion.data import latents, pipeline, tokenizers
from latent_diffusion.diffusion import guidance, process, samplers, schedules
from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.models.autoencoder import latents_from_moments
from latent_diffusion.models import autoencoder as autoencoder_model
from latent_diffusion.models.conditioners import ClassEmbedder, SpatialRescaler, TransformerEmbedder
from latent_diffusion.models.denoiser import LatentDenoiser
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, conditioning, loop, sharding
from latent_diffusion.train.state import TrainState, ema_decay

STAGE = 'diffusion'
SCALE_FACTOR_KEY = 0xFFFFFFFF  # fold_in data of the scale_by_std posterior sample; no step reaches it
SAMPLERS = ('ddim', 'ddpm', 'plms', 'dpm_solver')


def latent_shape(config, height: int = 0, width: int = 0) -> tuple[int, int, int]:
  """(h, w, c) of the stage-1 latents for the configured image size (or height x width pixels)."""
  f = autoencoder_model.factor_of(config.autoencoder)
  names = ('sample.height' if height else 'data.image_size', 'sample.width' if width else 'data.image_size')
  height, width = height or config.data.image_size, width or config.data.image_size
  for name, size in zip(names, (height, width)):
    if size % f:
      raise ConfigError(f'{name}={size} is not divisible by the autoencoder factor f={f}')
  return height // f, width // f, autoencoder_model.latent_channels_of(config.autoencoder)


def sample_shape(config) -> tuple[int, int, int]:
  """The latent shape of sample mode: sample.height x sample.width pixels (0 = data.image_size)."""
  return latent_shape(config, config.sample.height, config.sample.width)


def build_unet(config) -> UNetModel:
  c = config.unet
  channels = autoencoder_model.latent_channels_of(config.autoencoder)
  return UNetModel(in_channels=c.in_channels or channels, out_channels=channels,
                   model_channels=c.model_channels, num_res_blocks=c.num_res_blocks,
                   attention_resolutions=tuple(c.attention_resolutions), channel_mult=tuple(c.channel_mult),
                   dropout=c.dropout, conv_resample=c.conv_resample, num_heads=c.num_heads,
                   num_head_channels=c.num_head_channels, num_heads_upsample=c.num_heads_upsample,
                   use_scale_shift_norm=c.use_scale_shift_norm, resblock_updown=c.resblock_updown,
                   num_classes=c.num_classes, use_spatial_transformer=c.use_spatial_transformer,
                   transformer_depth=c.transformer_depth, context_dim=c.context_dim, legacy=c.legacy,
                   use_new_attention_order=c.use_new_attention_order, n_embed=c.n_embed,
                   attention_impl=c.attention_impl, remat=config.remat,
                   dtype=common.activation_dtype(config))


def build_cond_stage(config):
  """The trainable conditioning model of config.cond_stage, or None (none, or the first stage / the
  identity, whose conditions are made outside the denoiser)."""
  c = config.cond_stage
  if not config.diffusion.conditioning_key or config.diffusion.conditioning_key == 'adm':
    return None
  if c.kind == 'class':
    return ClassEmbedder(c.n_classes, c.embed_dim)
  if c.kind == 'transformer':
    return TransformerEmbedder(n_embed=c.n_embed, n_layer=c.n_layer, vocab_size=c.vocab_size,
                               max_seq_len=c.max_seq_len, embedding_dropout=c.embedding_dropout,
                               dtype=common.activation_dtype(config))
  if c.kind == 'spatial_rescaler':
    return SpatialRescaler(n_stages=c.n_stages, method=c.method, multiplier=c.multiplier,
                           in_channels=c.in_channels, out_channels=c.out_channels, bias=c.bias)
  if c.kind not in conditioning.COND_STAGES:
    raise ConfigError(f'cond_stage.kind: {c.kind!r} is not one of {", ".join(map(repr, conditioning.COND_STAGES))}')
  return None


def build_denoiser(config) -> LatentDenoiser:
  cond_input = conditioning.RAW_NAME.get(config.cond_stage.key, 'label')
  return LatentDenoiser(build_unet(config), build_cond_stage(config), config.diffusion.conditioning_key,
                        cond_input)


def example_conditions(config, batch_size: int, latent: tuple[int, int, int] | None = None) -> dict:
  """Zero raw conditions of the right shapes, for init and shape inference."""
  h, w, c = latent or latent_shape(config)
  f = autoencoder_model.factor_of(config.autoencoder)
  shapes = {'label': ((batch_size,), jnp.int32),
            'tokens': ((batch_size, config.cond_stage.max_seq_len), jnp.int32),
            'segmentation': ((batch_size, h * f, w * f), jnp.int32),
            'concat': ((batch_size, h, w, max(config.unet.in_channels - c, 0)), jnp.float32)}
  return {name: jnp.zeros(*shapes[name]) for name in conditioning.raw_names(config)}


def init_params(model: LatentDenoiser, config, rng):
  """{'unet': ..., 'cond_stage': ... (if any), 'logvar': (T,) (if learned)}."""
  params = dict(model.init(rng, jnp.zeros((1,) + latent_shape(config), jnp.float32),
                           jnp.zeros((1,), jnp.int32), example_conditions(config, 1))['params'])
  if config.diffusion.learn_logvar:
    params['logvar'] = jnp.full((config.diffusion.timesteps,), config.diffusion.logvar_init, jnp.float32)
  return params


def model_params(params) -> dict:
  """The denoiser's parameters: the train state's params without the learned log-variance."""
  return {name: value for name, value in params.items() if name != 'logvar'}


def learning_rate_schedule(train_config) -> optax.ScalarOrSchedule:
  """LambdaLinearScheduler's warm-up from 1e-6 x lr, then the constant rate (the paper's), then, with
  `cooldown_steps`, a linear decay to 0 over the last cooldown_steps of num_steps (warmup-stable-decay).

  The decay is placed by num_steps alone, so a run trained at the constant rate after a warm-up can be
  resumed with a larger num_steps and a cooldown to anneal it. Without warm-up or cooldown the rate is a
  bare float, as in checkpoints written before the cooldown existed: that optimizer state has no schedule
  count, so such a run cannot take a cooldown later. The schedule counts optimizer updates: warmup_steps
  are updates (as the paper's scheduler), num_steps and cooldown_steps are batches, divided here by
  accumulate_grad_batches.
  """
  peak, warmup, cooldown = train_config.learning_rate, train_config.warmup_steps, train_config.cooldown_steps
  if not 0 <= cooldown <= train_config.num_steps:
    raise ConfigError(f'diffusion_train.cooldown_steps: must be in [0, num_steps={train_config.num_steps}], '
                      f'got {cooldown}')
  stable = optax.warmup_constant_schedule(1e-6 * peak, peak, warmup) if warmup else optax.constant_schedule(peak)
  if not cooldown:
    return stable if warmup else peak
  k = train_config.accumulate_grad_batches
  return optax.join_schedules([stable, optax.linear_schedule(peak, 0.0, max(cooldown // k, 1))],
                              [(train_config.num_steps - cooldown) // k])


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW (torch defaults, as the paper) at `learning_rate_schedule`."""
  return common.accumulate_gradients(
      optax.adamw(learning_rate_schedule(train_config), b1=0.9, b2=0.999, eps=1e-8,
                  weight_decay=train_config.weight_decay),
      train_config)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The static settings of the stage-2 loss (hashable: a jit static argument)."""
  parameterization: str = 'eps'
  loss_type: str = 'l2'
  l_simple_weight: float = 1.0
  original_elbo_weight: float = 0.0
  learn_logvar: bool = False
  logvar_init: float = 0.0
  cond_drop_prob: float = 0.0
  null_label: int | None = None
  null_tokens: tuple[int, ...] | None = None  # the empty caption / layout (text and layout models)
  scale_encoded_concat: bool = False  # cond_stage.scale_first_stage (inpainting): see scale_encoded_concat

  @classmethod
  def from_config(cls, config, tokenizer=None) -> 'Objective':
    d = config.diffusion
    nulls = conditioning.null_values(config, tokenizer)
    tokens = tuple(int(t) for t in nulls['tokens']) if 'tokens' in nulls else None
    return cls(d.parameterization, d.loss_type, d.l_simple_weight, d.original_elbo_weight, d.learn_logvar,
               d.logvar_init, d.cond_drop_prob, nulls.get('label'), tokens, scales_encoded_concat(config))

  @property
  def nulls(self) -> dict:
    nulls = {} if self.null_label is None else {'label': self.null_label}
    if self.null_tokens is not None:
      nulls['tokens'] = np.asarray(self.null_tokens, np.int32)
    return nulls


def diffusion_loss(model, params, latents, raw, rng, schedule, objective: Objective, deterministic=True):
  """The paper's p_losses on a batch of latents with raw conditions. Returns (loss, metrics)."""
  t_rng, noise_rng, dropout_rng, drop_rng = jax.random.split(rng, 4)
  t = jax.random.randint(t_rng, (latents.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
  x_t = process.q_sample(schedule, latents, t, noise)
  raw = conditioning.drop_conditions(raw, drop_rng, objective.cond_drop_prob, objective.nulls)
  output = model.apply({'params': model_params(params)}, x_t, t, raw, deterministic=deterministic,
                       rngs={'dropout': dropout_rng})
  target = process.training_target(schedule, objective.parameterization, latents, noise, t)
  logvar = (params['logvar'] if objective.learn_logvar
            else jnp.full((schedule.num_timesteps,), objective.logvar_init, jnp.float32))
  return process.diffusion_loss(
      output, target, t, loss_type=objective.loss_type, logvar=logvar,
      l_simple_weight=objective.l_simple_weight, original_elbo_weight=objective.original_elbo_weight,
      lvlb_weights=process.lvlb_weights(schedule, objective.parameterization))


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, objective: Objective,
               base_ema_decay, deterministic, autoencoder_kind='kl', uses_labels=False,
               cond_names: tuple[str, ...] | None = None) -> tuple:
  """One step on batch['moments'] (the stage-1 encoding; z is sampled (kl) and scaled here) and the
  raw conditions `cond_names` of the batch (default: 'label' when uses_labels)."""
  posterior_rng, loss_rng = jax.random.split(state.step_rng())
  latents = latents_from_moments(autoencoder_kind, batch['moments'], posterior_rng) * state.extras['scale_factor']
  if cond_names is None:
    cond_names = ('label',) if uses_labels else ()
  raw = {name: batch[name] for name in cond_names}
  if objective.scale_encoded_concat:
    raw = scale_encoded_concat(raw, state.extras['scale_factor'])
  grad_fn = jax.value_and_grad(
      lambda p: diffusion_loss(model, p, latents, raw, loss_rng, schedule, objective, deterministic),
      has_aux=True)
  (loss, metrics), grads = grad_fn(state.params)
  decay = ema_decay(base_ema_decay, state.step + 1)
  state, skipped = state.apply_gradients_if_finite(grads, tx, loss, ema_decay_value=decay)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads), ema_decay=decay,
                 nonfinite=skipped.astype(jnp.float32))
  return state, metrics


def create_state(model, config, rng, tx) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  return state_from_params(init_params(model, config, init_rng), tx, state_rng)


def state_from_params(params, tx, rng) -> TrainState:
  """A step-0 state around given parameters: fresh optimizer state, EMA = params, scale_factor 1."""
  return TrainState.create(params, tx, rng, ema=True, extras={'scale_factor': jnp.ones((), jnp.float32)})


def scale_factor_from_moments(moments, rng, autoencoder_kind='kl') -> jax.Array:
  """The paper's scale_by_std: 1 / std of the first batch's latents (posterior samples for kl)."""
  return 1.0 / jnp.std(latents_from_moments(autoencoder_kind, moments, rng))


def run_sampler(sampling, model_fn, x_T, rng, schedule, num_steps: int, parameterization: str,
                clip_denoised: bool = False, known=None, init=None):
  """Latents from noise x_T with the sampler named by sample.sampler; `known` (keep, x0_known): DDIM's
  masked sampling (see known_latents); `init`: img2img's start latents, run at sample.strength."""
  if known is not None and sampling.sampler != 'ddim':
    raise ConfigError(f'sample.keep_known_latents: needs sample.sampler=ddim, got {sampling.sampler!r}')
  img2img = {'x0_init': init, 'strength': sampling.strength}
  try:
    if sampling.sampler == 'ddim':
      keep, x0_known = known if known is not None else (None, None)
      return samplers.ddim_sample(model_fn, x_T, rng, schedule, num_steps, sampling.eta, sampling.spacing,
                                  parameterization=parameterization, mask=keep, x0_known=x0_known, **img2img)
    if sampling.sampler == 'ddpm':
      return samplers.ddpm_sample(model_fn, x_T, rng, schedule,
                                  None if num_steps >= schedule.num_timesteps else num_steps,
                                  parameterization=parameterization, clip_denoised=clip_denoised, **img2img)
    if sampling.sampler == 'plms':
      return samplers.plms_sample(model_fn, x_T, schedule, num_steps, spacing=sampling.spacing,
                                  parameterization=parameterization, **img2img)
    if sampling.sampler == 'dpm_solver':
      return samplers.dpm_solver_sample(model_fn, x_T, schedule, num_steps, spacing=sampling.spacing,
                                        parameterization=parameterization, **img2img)
  except samplers.StrengthError as e:
    raise ConfigError(f'sample.strength: {e} (sample.sampler={sampling.sampler}, '
                      f'sample.num_steps={num_steps})') from e
  raise ConfigError(f'sample.sampler: {sampling.sampler!r} is not one of {", ".join(SAMPLERS)}')


def guided_model_fn(model: LatentDenoiser, params, raw: dict, guidance_scale: float, nulls):
  """A sampler's model_fn(x, t): the denoiser with the raw conditions encoded once, with classifier-free
  guidance against the null conditions when guidance_scale != 1."""
  variables = {'params': model_params(params)}
  apply_fn = lambda x, t, encoded: model.apply(variables, x, t, encoded, method=model.denoise)
  encoded = model.apply(variables, raw, method=model.condition)
  if guidance_scale == 1.0:
    return lambda x, t: apply_fn(x, t, encoded)
  unconditional = model.apply(variables, conditioning.null_conditions(raw, nulls), method=model.condition)
  return guidance.classifier_free_guidance(apply_fn, encoded, unconditional, guidance_scale)


def sample_latents(model: LatentDenoiser, config, schedule, params, rng, raw, num_samples: int,
                   num_steps: int, shape: tuple[int, int, int] | None = None, nulls=None,
                   batch_sharding=None, known=None, residual_fn=None, init=None) -> jax.Array:
  """Latents (num_samples, h, w, c) drawn with config.sample's sampler and guidance; `shape` (h, w, c)
  defaults to the training latents; `batch_sharding` splits the samples over devices; `known`: see
  known_latents; `residual_fn`: see image_residual_fn; given, the sampler follows the image-space guider
  at sample.image_guidance_scale; `init`: img2img's start latents (see init_latents)."""
  if nulls is None:
    nulls = conditioning.null_values(config)
  model_fn = guided_model_fn(model, params, raw, config.sample.guidance_scale, nulls)
  if residual_fn is not None:
    model_fn = guidance.image_guidance(model_fn, schedule, config.diffusion.parameterization, residual_fn,
                                       config.sample.image_guidance_scale)
  noise_rng, sampler_rng = jax.random.split(rng)
  x_T = jax.random.normal(noise_rng, (num_samples,) + (shape or latent_shape(config)))
  if batch_sharding is not None:
    x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
  return run_sampler(config.sample, model_fn, x_T, sampler_rng, schedule, num_steps,
                     config.diffusion.parameterization, config.diffusion.clip_denoised, known, init)


def known_latents(concat, mask, scale_factor) -> tuple[jax.Array, jax.Array]:
  """(keep, x0_known) of masked DDIM for an inpainting model, from its unscaled concat condition (the
  stage-1 encoding of the masked image, then the mask channel) and the pixel mask (B, H, W, 1), 1 where
  the image is to be filled. keep (B, h, w, 1) is 1 at latents none of whose pixels, nor those of their
  8 neighbours (the encoder's reach beyond its own f x f cell), is to be filled; x0_known is the masked
  image's encoding in the units of the diffused latents. Nothing of the hidden pixels enters either."""
  height, width = concat.shape[1:3]
  f = mask.shape[1] // height
  if f * height != mask.shape[1] or f * width != mask.shape[2]:
    raise ValueError(f'inpainting mask {mask.shape[1:3]} is not a multiple of the latent size {(height, width)}')
  hole = jax.lax.reduce_window(mask.astype(jnp.float32), -jnp.inf, jax.lax.max, (1, f, f, 1), (1, f, f, 1), 'VALID')
  hole = jax.lax.reduce_window(hole, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), 'SAME')
  return 1.0 - hole, concat[..., :-1] * scale_factor


def init_latents(config, autoencoder, ae_params, images, scale_factor) -> jax.Array:
  """img2img's start: images (B, H, W, 3) in [-1, 1] encoded by stage 1 (a KL posterior's mode, so the
  same image always starts at the same latents) in the units of the diffused latents."""
  moments = autoencoder.apply({'params': ae_params}, images.astype(jnp.float32), method=autoencoder.encode_moments)
  return latents_from_moments(config.autoencoder.kind, moments) * scale_factor


def decode_latents(autoencoder, ae_params, latents, scale_factor) -> jax.Array:
  """Images (B, H, W, 3), unclipped, of latents in the units of the diffused latents."""
  return autoencoder.apply({'params': ae_params}, latents / scale_factor, method=autoencoder.decode)


def image_residual_fn(config, autoencoder, ae_params, inputs: dict, scale_factor):
  """residual_fn(x0) of the image-space guider (guidance.image_guidance) for a restoration model: the
  decoded clean estimate against what the input shows of the truth. Super-resolution: the decoded image
  downsampled to the low-resolution input's size (antialiased bicubic, the degradation of
  data.degradation='bicubic') minus that input. Inpainting: the decoded image minus the image, on the
  known pixels only (nothing of the hole enters)."""
  decode = lambda x0: decode_latents(autoencoder, ae_params, x0, scale_factor).astype(jnp.float32)
  if config.cond_stage.key == 'low_res':
    low_res = inputs['low_res'].astype(jnp.float32)

    def residual(x0):
      image = decode(x0)
      small = jax.image.resize(image, image.shape[:1] + low_res.shape[1:3] + image.shape[3:], 'bicubic',
                               antialias=True)
      return small - low_res
    return residual
  if config.cond_stage.key == 'masked_image':
    image, known = inputs['image'].astype(jnp.float32), 1.0 - inputs['mask'].astype(jnp.float32)
    return lambda x0: (decode(x0) - image) * known
  raise ConfigError(f'sample.image_guidance_scale: needs a restoration model (cond_stage.key low_res or '
                    f'masked_image), got cond_stage.key={config.cond_stage.key!r}')


def concat_from_pixels(config, autoencoder, ae_params, batch: dict, latent_hw: tuple[int, int]) -> jax.Array:
  """The concat condition of pixel-space inputs, at latent size (B, h, w, c'):
  low_res: the low-resolution image itself (the paper's concat_mode SR; resized when its side is not
  the latent side); masked_image: the first-stage encoding of the masked image (its mode, unscaled, as
  the paper's cond_stage `__is_first_stage__`) and the mask in {-1, 1}, as the paper's inpainting."""
  if config.cond_stage.key == 'low_res':
    low_res = batch['low_res']
    if low_res.shape[1:3] != tuple(latent_hw):
      low_res = jax.image.resize(low_res, low_res.shape[:1] + tuple(latent_hw) + low_res.shape[3:], 'bicubic')
    return low_res.astype(jnp.float32)
  image, mask = batch['image'], batch['mask']
  masked = image * (1.0 - mask) - mask  # (1 - mask) * image in [0, 1], mapped to [-1, 1]
  moments = autoencoder.apply({'params': ae_params}, masked, method=autoencoder.encode_moments)
  encoded = latents_from_moments(config.autoencoder.kind, moments)
  small = jax.image.resize(mask * 2.0 - 1.0, mask.shape[:1] + tuple(latent_hw) + (1,), 'nearest')
  return jnp.concatenate([encoded, small], axis=-1)


def scales_encoded_concat(config) -> bool:
  return config.cond_stage.scale_first_stage and conditioning.condition_key(config) == 'masked_image'


def scale_encoded_concat(raw: dict, scale_factor) -> dict:
  """The masked image's stage-1 encoding (all concat channels but the mask's) times scale_factor: in
  the units of the diffused latents. The paper feeds it unscaled, which suits VQ latents (about unit
  scale); a KL stage 1 trained with a small KL weight has latents of std 5 and outliers near 30."""
  concat = raw['concat']
  return dict(raw, concat=jnp.concatenate([concat[..., :-1] * scale_factor, concat[..., -1:]], axis=-1))


def device_conditions(config, autoencoder, ae_params, batch: dict, latent_hw) -> dict:
  """The raw conditions of a (device) batch of host inputs (train/conditioning.host_inputs)."""
  raw = {name: batch[name] for name in conditioning.raw_names(config) if name != 'concat'}
  if 'concat' in conditioning.raw_names(config):
    raw['concat'] = (concat_from_pixels(config, autoencoder, ae_params, batch, latent_hw)
                     if config.cond_stage.key in conditioning.RESTORATION_KEYS else batch['concat'])
  return raw


def make_sampler(model: LatentDenoiser, autoencoder, config, schedule, shape=None, tokenizer=None, mesh=None):
  """A jitted fn(params, ae_params, scale_factor, rng, inputs, *, num_samples, num_steps) -> images
  (num_samples, H, W, 3) in [-1, 1]; inputs are host inputs of the conditions (train/conditioning.py:
  e.g. {'label': (N,)}, {'tokens': (N, L)}, {'image', 'mask'} for inpainting) or {}, plus 'init_image'
  (N, H, W, 3) in [-1, 1] for img2img at sample.strength. `shape`: the latent
  (h, w, c), default the training size; convolutional models sample larger ones. With a `mesh`, the
  samples are split over its devices (num_samples must divide by their number) and so are the images.

  It compiles once per (num_samples, num_steps): both are static, the loop is one scan.
  """
  shape = shape or latent_shape(config)
  nulls = conditioning.null_values(config, tokenizer)
  batch_sharding = None if mesh is None else sharding.batch_sharding(mesh)

  def sample(params, ae_params, scale_factor, rng, inputs, *, num_samples, num_steps):
    raw = device_conditions(config, autoencoder, ae_params, inputs, shape[:2])
    known = (known_latents(raw['concat'], inputs['mask'], scale_factor)
             if config.sample.keep_known_latents else None)
    residual_fn = (image_residual_fn(config, autoencoder, ae_params, inputs, scale_factor)
                   if config.sample.image_guidance_scale > 0 else None)
    init = (init_latents(config, autoencoder, ae_params, inputs['init_image'], scale_factor)
            if 'init_image' in inputs else None)
    if scales_encoded_concat(config):
      raw = scale_encoded_concat(raw, scale_factor)
    latents = sample_latents(model, config, schedule, params, rng, raw, num_samples, num_steps, shape, nulls,
                             batch_sharding, known, residual_fn, init)
    return jnp.clip(decode_latents(autoencoder, ae_params, latents, scale_factor), -1.0, 1.0)

  placement = {} if batch_sharding is None else {'out_shardings': batch_sharding}
  return jax.jit(sample, static_argnames=('num_samples', 'num_steps'), **placement)


def sample_conditions(config, num_samples: int) -> dict:
  """The host inputs of a sample grid's conditions (class labels cycle, or sample.class_label; other
  conditions come from sample.* inputs or the held-out data, see sample_inputs.py)."""
  if conditioning.uses_labels(config):
    return {'label': conditioning.sampling_labels(config, num_samples)}
  if not conditioning.is_conditional(config):
    return {}
  return sample_inputs.grid_inputs(config, num_samples, make_tokenizer(config))[0]


def make_tokenizer(config):
  """The tokenizer of text and layout models (train/conditioning.py), else None."""
  return tokenizers.make_tokenizer(config.cond_stage) if conditioning.uses_tokens(config) else None


def moment_batches(config, workdir, autoencoder, ae_params, mesh, tokenizer=None):
  """(iterator, generator of global batches {'moments', raw conditions}): the stage-1 posterior of each
  image and its conditions, encoded on the fly, or read from a cache encoded once
  (diffusion_train.precompute_latents: unconditional and class-conditional models)."""
  train_config = config.diffusion_train
  encode = jax.jit(lambda params, x: autoencoder.apply({'params': params}, x,
                                                         method=autoencoder.encode_moments))
  if not train_config.precompute_latents:
    iterator = pipeline.make_iterator(config.data, seed=config.seed + 1,
                                      batch_size=common.local_batch_size(train_config.batch_size, mesh))
    latent_hw = latent_shape(config)[:2]

    @jax.jit
    def prepare(params, inputs):
      return dict(device_conditions(config, autoencoder, params, inputs, latent_hw),
                  moments=autoencoder.apply({'params': params}, inputs['image'], method=autoencoder.encode_moments))

    return iterator, (prepare(ae_params, sharding.global_batch(conditioning.host_inputs(config, batch, tokenizer),
                                                                mesh)) for batch in iterator)

  if conditioning.raw_names(config) not in ((), ('label',)):
    raise ConfigError('diffusion_train.precompute_latents: only unconditional and class-conditional models '
                      f'train from a latent cache; cond_stage.key={config.cond_stage.key!r} needs the images '
                      'each step (set it False)')

  # Each process encodes its own slice on its own devices: slices differ in length, so no
  # computation may span processes here.
  local_mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ('data',))
  local_params = jax.device_put(multihost_utils.process_allgather(ae_params, tiled=True),
                                jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec()))
  local_batch = jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec('data'))
  local_batch_size = common.local_batch_size(train_config.batch_size, mesh)
  cache = common.stage_dir(workdir, STAGE) / 'latents'
  latents.write_cache(
      cache, config.data, lambda images: np.asarray(encode(local_params, jax.device_put(images, local_batch))),
      batch_size=local_batch_size,
      fingerprint={'autoencoder_step': common.latest_step(workdir, stage1.STAGE),
                   'autoencoder': config.autoencoder.to_dict()},
      with_labels=conditioning.uses_labels(config))
  iterator = latents.make_iterator(cache, batch_size=local_batch_size, seed=config.seed + 1,
                                   flip=config.data.flip)
  return iterator, (sharding.global_batch(batch, mesh) for batch in iterator)


def schedule_from_config(config) -> schedules.Schedule:
  return schedules.schedule_from_config(config.diffusion)


def sampler_tag(config) -> str:
  """e.g. 'ddim50_eta0', 'ddim5_trailing_eta0' or 'plms50_cfg3': names sample files by how they were drawn."""
  sampling = config.sample
  tag = f'{sampling.sampler}{sampling.num_steps}'
  if sampling.spacing != 'uniform':
    tag += f'_{sampling.spacing}'
  if sampling.sampler == 'ddim':
    tag += f'_eta{sampling.eta:g}'
  if sampling.guidance_scale != 1.0:
    tag += f'_cfg{sampling.guidance_scale:g}'
  if sampling.keep_known_latents:
    tag += '_known'
  if sampling.image_guidance_scale > 0:
    tag += f'_ig{sampling.image_guidance_scale:g}'
  return tag


def abstract_state(model, config, mesh):
  tx = make_optimizer(config.diffusion_train)
  abstract = jax.eval_shape(functools.partial(create_state, model, config, tx=tx), jax.random.PRNGKey(0))
  return abstract, sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)


def unet_kwargs(config) -> dict:
  """build_unet's keyword arguments (what a converter needs to know of the U-Net's layout)."""
  unet = build_unet(config)
  return {field: getattr(unet, field) for field in unet.__dataclass_fields__
          if field not in ('parent', 'name')}


def save_converted(config, workdir) -> int:
  """convert mode with convert.stage=diffusion: a whole LDM (a paper .ckpt or a diffusers pipeline
  folder, config.convert.source) becomes complete stage-1 and stage-2 checkpoints in the workdir, at
  their num_steps, so `sample` runs at once and `train` goes on from there. The U-Net's EMA copy is
  taken when convert.use_ema and the checkpoint has one; it serves as both params and EMA."""
  from latent_diffusion.convert import ldm  # pylint: disable=g-import-not-at-top
  checkpoints = common.stage_checkpoints(workdir, STAGE, config.diffusion_train)
  try:
    if checkpoints.latest_step() is not None:
      raise CheckpointError(f'{checkpoints.directory} already holds stage-2 checkpoints; convert into '
                            'a new workdir (nothing was changed)')
    mesh = sharding.make_mesh(config.mesh)
    model = build_denoiser(config)
    abstract, shardings = abstract_state(model, config, mesh)
    params, scale_factor = ldm.load_denoiser_params(config.convert.source, model_params(abstract.params),
                                                    unet_kwargs(config), config.convert.use_ema)
    stage1.save_converted(config, workdir)
    tx = make_optimizer(config.diffusion_train)
    state = jax.jit(functools.partial(create_state, model, config, tx=tx),
                    out_shardings=shardings)(jax.random.PRNGKey(config.seed + 1))
    params = jax.device_put(dict(state.params, **params), shardings.params)
    if scale_factor is None:
      scale_factor = config.diffusion.scale_factor
    step = config.diffusion_train.num_steps
    state = state.replace(params=params, ema_params=params, step=jnp.asarray(step, jnp.int32),
                          extras={'scale_factor': jax.device_put(jnp.asarray(scale_factor, jnp.float32),
                                                                 sharding.replicated(mesh))})
    checkpoints.save(step, state, force=True)
    logging.info('convert: %s -> %s step %d (scale_factor %g)', config.convert.source,
                 checkpoints.directory, step, scale_factor)
    return step
  finally:
    checkpoints.close()


def is_complete(config, workdir) -> bool:
  return common.is_stage_complete(workdir, STAGE, config.diffusion_train.num_steps)


def train(config, workdir) -> TrainState:
  """Train stage 2 on the latents of the trained stage 1, resuming from <workdir>/diffusion."""
  directory = common.stage_dir(workdir, STAGE)
  loop.write_config(directory, config)
  train_config = config.diffusion_train
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  model = build_denoiser(config)
  schedule = schedule_from_config(config)
  tokenizer = make_tokenizer(config)
  iterator, batches = moment_batches(config, workdir, autoencoder, ae_params, mesh, tokenizer)
  checkpoints = common.stage_checkpoints(workdir, STAGE, train_config)
  tx = make_optimizer(train_config)
  abstract, shardings = abstract_state(model, config, mesh)
  state, resumed = loop.restore_or_create(checkpoints, abstract, shardings,
                                          functools.partial(create_state, model, config, tx=tx),
                                          jax.random.PRNGKey(config.seed + 1), iterator)
  if resumed:
    logging.info('diffusion: resumed from step %d (scale_factor %.5f)', int(state.step),
                 float(state.extras['scale_factor']))
  else:
    scale_factor = config.diffusion.scale_factor
    if config.diffusion.scale_by_std:
      # Uses the first batch only to measure the latent std; training starts from the next one.
      first = next(batches)
      scale_factor = scale_factor_from_moments(first['moments'],
                                               jax.random.fold_in(state.rng, SCALE_FACTOR_KEY),
                                               config.autoencoder.kind)
      logging.info('diffusion: scale_by_std, scale_factor = 1/std(z) = %.5f', float(scale_factor))
    state = state.replace(extras={'scale_factor': jax.device_put(
        jnp.asarray(scale_factor, jnp.float32), sharding.replicated(mesh))})
  logging.info('diffusion: mesh %s, %s', dict(mesh.shape),
               sharding.describe_param_sharding(abstract.params, shardings.params))
  logging.info('diffusion: %s parameters, latents %s, conditioning %r',
               {name: sum(np.size(x) for x in jax.tree.leaves(part)) for name, part in abstract.params.items()},
               latent_shape(config), config.diffusion.conditioning_key)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        objective=Objective.from_config(config, tokenizer),
                        base_ema_decay=train_config.ema_decay,
                        deterministic=config.unet.dropout == 0.0 and config.cond_stage.embedding_dropout == 0.0,
                        autoencoder_kind=config.autoencoder.kind, cond_names=conditioning.raw_names(config)),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  sampler = make_sampler(model, autoencoder, config, schedule, tokenizer=tokenizer)
  sampling = config.sample
  grid_inputs, grid_display = sample_inputs.grid_inputs(config, sampling.batch_size, tokenizer, from_cli=False)

  def write_samples(state, step):
    params = state.ema_params if sampling.use_ema else state.params
    samples = sampler(params, ae_params, state.extras['scale_factor'], jax.random.PRNGKey(sampling.seed),
                      grid_inputs, num_samples=sampling.batch_size, num_steps=sampling.num_steps)
    if jax.process_index() == 0:
      path = sample_inputs.save_grid(config, directory / 'samples' / f'{sampler_tag(config)}_{step:07d}.png',
                                     np.asarray(samples), grid_display)
      logging.info('diffusion: wrote %s', path)

  try:
    return loop.run_steps(
        name='diffusion', state=state, train_step=step_fn, batches=batches, iterator=iterator,
        checkpoints=checkpoints, writer=loop.make_writer(directory),
        total_steps=train_config.num_steps, log_every=config.log_every_steps,
        max_nonfinite_steps=config.max_nonfinite_steps, metrics_path=directory / 'metrics.jsonl',
        periodic=[(train_config.sample_every_steps, write_samples)])
  finally:
    checkpoints.close()
