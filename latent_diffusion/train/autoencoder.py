"""Stage 1: train AutoencoderKL or VQModel with the paper's objective (autoencoder_loss.py):
pixel + LPIPS reconstruction, KL or codebook regulariser, PatchGAN with the adaptive weight.

The train state holds params {'autoencoder', 'discriminator', 'logvar'} (one optax.multi_transform
with an Adam for the autoencoder and one for the discriminator, as the paper's two optimizers) and
the discriminator's BatchNorm statistics in extras['discriminator_state']. One compiled step
updates both networks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from latent_diffusion import images as image_io
from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel
from latent_diffusion.models.discriminator import NLayerDiscriminator
from latent_diffusion.models.quantize import codebook_usage, count_indices
from latent_diffusion.train import autoencoder_loss, common, loop, sharding
from latent_diffusion.train.state import TrainState

STAGE = 'autoencoder'
KINDS = ('kl', 'vq', 'identity')  # identity: no first stage, pixel-space diffusion (LDM-1)


def build_autoencoder(config) -> AutoencoderKL | VQModel:
  c = config.autoencoder
  if c.kind not in KINDS:
    raise ConfigError(f'autoencoder.kind: {c.kind!r} is not one of {", ".join(KINDS)}')
  common_fields = dict(
      ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
      attn_resolutions=tuple(c.attn_resolutions), resolution=config.data.image_size,
      in_channels=c.in_channels, out_ch=c.out_ch, z_channels=c.z_channels, double_z=c.double_z,
      embed_dim=c.embed_dim, dropout=c.dropout, norm_num_groups=c.norm_num_groups,
      remat=config.remat, attn_type=c.attn_type, dtype=common.activation_dtype(config))
  if c.kind == 'identity':
    return IdentityFirstStage(in_channels=c.in_channels)
  if c.kind == 'kl':
    return AutoencoderKL(**common_fields)
  unknown_index = int(c.unknown_index) if str(c.unknown_index).lstrip('-').isdigit() else c.unknown_index
  return VQModel(n_embed=c.n_embed, beta=c.beta, legacy=c.legacy, remap=c.remap or None,
                 unknown_index=unknown_index, **common_fields)


def build_discriminator(config) -> NLayerDiscriminator:
  c = config.autoencoder_loss
  return NLayerDiscriminator(ndf=c.disc_ndf, n_layers=c.disc_num_layers,
                             use_actnorm=c.disc_use_actnorm, dtype=common.activation_dtype(config))


def init_params(model, config, rng):
  size = config.data.image_size
  return model.init(rng, jnp.zeros((1, size, size, model.in_channels), jnp.float32))['params']


def make_optimizer(config) -> optax.GradientTransformation:
  """The paper's two Adams (b1, b2; same learning rate) over the autoencoder and the discriminator,
  as one multi_transform; logvar joins the autoencoder's only with learn_logvar."""
  train_config = config.autoencoder_train
  learning_rate = train_config.learning_rate
  if train_config.warmup_steps:
    learning_rate = optax.linear_schedule(0.0, learning_rate, train_config.warmup_steps)
  adam = lambda: optax.adam(learning_rate, b1=train_config.adam_b1, b2=train_config.adam_b2)
  learn_logvar = config.autoencoder_loss.learn_logvar
  labels = lambda params: {
      'autoencoder': jax.tree.map(lambda _: 'autoencoder', params['autoencoder']),
      'discriminator': jax.tree.map(lambda _: 'discriminator', params['discriminator']),
      'logvar': 'autoencoder' if learn_logvar else 'frozen'}
  tx = optax.multi_transform({'autoencoder': adam(), 'discriminator': adam(),
                              'frozen': optax.set_to_zero()}, labels)
  return common.accumulate_gradients(tx, train_config)


def make_perceptual(config, required: bool = False):
  """(lpips_fn(params, images, reconstructions) -> LPIPS per image (B,), its frozen VGG16 params),
  or (None, None) when the loss does not use it and it is not `required`.

  The params travel as a jit argument: as closure constants they would be baked into every program.
  """
  loss_config = config.autoencoder_loss
  if loss_config.perceptual_weight <= 0 and not required:
    return None, None
  from latent_diffusion.models import lpips  # pylint: disable=g-import-not-at-top
  for field, expected in (('lpips_vgg_path', "torchvision's vgg16-397923af.pth"),
                          ('lpips_heads_path', "the lpips package's weights/v0.1/vgg.pth")):
    if not loss_config[field]:
      raise ConfigError(f'autoencoder_loss.{field}: not set; LPIPS (perceptual_weight='
                        f'{loss_config.perceptual_weight}) needs {expected}, which nothing here can '
                        'download (or set autoencoder_loss.perceptual_weight=0)')
  params = lpips.load_lpips_params(loss_config.lpips_vgg_path, loss_config.lpips_heads_path)
  model = lpips.LPIPS(dtype=common.activation_dtype(config))
  return (lambda p, x, y: model.apply({'params': p}, x, y).reshape(x.shape[0])), params


def _disc_apply(discriminator):
  def apply(params, state, images):
    if not state:  # ActNorm: no running statistics
      return discriminator.apply({'params': params}, images, train=True), state
    logits, updates = discriminator.apply({'params': params, 'batch_stats': state}, images,
                                          train=True, mutable=['batch_stats'])
    return logits, updates['batch_stats']
  return apply


# The parameters that define the latent space: frozen by autoencoder_train.train_decoder_only.
ENCODER_SIDE = ('encoder', 'quant_conv', 'quantize')


def with_encoder_side(params: dict, source: dict) -> dict:
  """Autoencoder `params` with their ENCODER_SIDE subtrees taken from `source`.

  train_decoder_only uses it twice: on a stop_gradient copy in the forward pass (XLA then drops the
  encoder's backward), and after the update to put back the old values. Zero gradients alone would
  not freeze them: Adam's momentum from earlier steps still moves them. Zeroing the updates inside the
  optimizer (relabelling them in the multi_transform) would change the optimizer state's structure,
  and a full run's checkpoint could no longer resume into a decoder-only fine-tune.
  """
  return {name: source[name] if name in ENCODER_SIDE else value for name, value in params.items()}


def _forward(model, kind, images, rng, deterministic, decoder_only=False):
  """model_params -> ((reconstructions, reg), (conv_out input, conv_out kernel shape, aux)).
  decoder_only: no gradient flows into ENCODER_SIDE."""
  posterior_rng, dropout_rng, quantize_rng = jax.random.split(rng, 3)

  def forward(model_params):
    if decoder_only:
      model_params = with_encoder_side(model_params, jax.lax.stop_gradient(model_params))
    outputs, variables = model.apply(
        {'params': model_params}, images, rng=posterior_rng if kind == 'kl' else None,
        deterministic=deterministic, rngs={'dropout': dropout_rng, 'quantize': quantize_rng},
        mutable=['intermediates'])
    conv_out_input = variables['intermediates']['decoder']['conv_out_input'][0]
    kernel_shape = model_params['decoder']['conv_out']['kernel'].shape
    if kind == 'kl':
      reconstructions, posterior = outputs
      return (reconstructions, jnp.sum(posterior.kl()) / images.shape[0]), (conv_out_input, kernel_shape, {})
    reconstructions, codebook_loss, indices = outputs
    return (reconstructions, codebook_loss), (conv_out_input, kernel_shape, {'indices': indices})
  return forward


def train_step(state: TrainState, batch: dict, lpips_params=None, *, model, discriminator, lpips_fn,
               tx, config, deterministic) -> tuple:
  """One update of the autoencoder and the discriminator on batch['image']. Pure: randomness from
  fold_in(rng, step). lpips_params: the frozen LPIPS weights (None without a perceptual loss)."""
  images, kind = batch['image'], config.autoencoder.kind
  decoder_only = config.autoencoder_train.train_decoder_only
  grads, disc_state, loss, metrics, reconstructions, aux = autoencoder_loss.generator_and_discriminator_grads(
      forward=_forward(model, kind, images, state.step_rng(), deterministic, decoder_only),
      model_params=state.params['autoencoder'], logvar=state.params['logvar'],
      disc_params=state.params['discriminator'], disc_state=state.extras['discriminator_state'],
      images=images, step=state.step, kind=kind, loss_config=config.autoencoder_loss,
      perceptual_fn=lpips_fn and functools.partial(lpips_fn, lpips_params),
      disc_apply=_disc_apply(discriminator),
      use_gan=config.autoencoder_loss.disc_start < config.autoencoder_train.num_steps)
  new_state, skipped = state.apply_gradients_if_finite(grads, tx, loss)
  if decoder_only:
    new_state = new_state.replace(params={
        **new_state.params,
        'autoencoder': with_encoder_side(new_state.params['autoencoder'], state.params['autoencoder'])})
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skipped, b, a), new, old)
  new_state = new_state.replace(extras={
      **new_state.extras,
      'discriminator_state': keep(disc_state, state.extras['discriminator_state'])})
  mse = jnp.mean(jnp.square(reconstructions - images))
  metrics.update(psnr=10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)),
                 grad_norm=optax.global_norm(grads['autoencoder']),
                 disc_grad_norm=optax.global_norm(grads['discriminator']),
                 nonfinite=skipped.astype(jnp.float32))
  if kind == 'vq':
    metrics.update(codebook_usage(aux['indices'], num_code_indices(config)))
  return new_state, metrics


def num_code_indices(config) -> int:
  c = config.autoencoder
  return count_indices(c.n_embed, c.remap or None, c.unknown_index)


def create_state(model, discriminator, config, rng, tx, disc_init_images=None) -> TrainState:
  """Fresh state. With ActNorm the discriminator initialises from `disc_init_images` (real data)."""
  init_rng, disc_rng, state_rng = jax.random.split(rng, 3)
  size = config.data.image_size
  if disc_init_images is None:
    disc_init_images = jnp.zeros((1, size, size, model.out_ch), jnp.float32)
  disc_variables = discriminator.init(disc_rng, disc_init_images, train=False)
  params = {'autoencoder': init_params(model, config, init_rng),
            'discriminator': disc_variables['params'],
            'logvar': jnp.full((), config.autoencoder_loss.logvar_init, jnp.float32)}
  return TrainState.create(params, tx, state_rng,
                           extras={'discriminator_state': disc_variables.get('batch_stats', {})})


def abstract_state(model, config, mesh):
  tx = make_optimizer(config)
  abstract = jax.eval_shape(functools.partial(create_state, model, build_discriminator(config), config, tx=tx),
                            jax.random.PRNGKey(0))
  return abstract, sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)


def load_params(config, workdir, mesh=None):
  """The latest stage-1 autoencoder parameters in <workdir>/autoencoder, for stage 2 and sampling."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  model = build_autoencoder(config)
  if config.autoencoder.kind == 'identity':
    return model, {}
  checkpoints = common.stage_checkpoints(workdir, STAGE)
  if checkpoints.latest_step() is None:
    raise CheckpointError(f'no autoencoder checkpoint in {checkpoints.directory}; '
                          'train stage 1 first (--config.mode=train_autoencoder)')
  abstract, shardings = abstract_state(model, config, mesh)
  state = checkpoints.restore(loop.abstract_with_shardings(abstract, shardings))
  checkpoints.close()
  return model, state.params['autoencoder']


def save_converted(config, workdir) -> int:
  """convert mode: autoencoder weights from a paper checkpoint or diffusers weights
  (config.convert.source) become a complete stage-1 checkpoint in <workdir>/autoencoder, at step
  autoencoder_train.num_steps, with a fresh discriminator and optimizer. Refuses to touch a
  workdir that already holds stage-1 checkpoints."""
  from latent_diffusion.convert import autoencoder as convert  # pylint: disable=g-import-not-at-top
  if not config.convert.source:
    raise ConfigError('convert.source: not set; give a paper .ckpt or a diffusers weights file or folder')
  checkpoints = common.stage_checkpoints(workdir, STAGE, config.autoencoder_train)
  try:
    if checkpoints.latest_step() is not None:
      raise CheckpointError(f'{checkpoints.directory} already holds stage-1 checkpoints; convert into '
                            'a new workdir (nothing was changed)')
    mesh = sharding.make_mesh(config.mesh)
    model = build_autoencoder(config)
    abstract, shardings = abstract_state(model, config, mesh)
    params = convert.load_autoencoder_params(config.convert.source, abstract.params['autoencoder'])
    tx = make_optimizer(config)
    state = jax.jit(functools.partial(create_state, model, build_discriminator(config), config, tx=tx),
                    out_shardings=shardings)(jax.random.PRNGKey(config.seed))
    params = jax.device_put(params, shardings.params['autoencoder'])
    # Adam's fresh state depends only on shapes, so create_state's opt_state fits these params too.
    state = state.replace(params={**state.params, 'autoencoder': params},
                          step=jnp.asarray(config.autoencoder_train.num_steps, jnp.int32))
    step = config.autoencoder_train.num_steps
    checkpoints.save(step, state, force=True)
    logging.info('convert: %s -> %s step %d', config.convert.source, checkpoints.directory, step)
    return step
  finally:
    checkpoints.close()


def is_complete(config, workdir) -> bool:
  if config.autoencoder.kind == 'identity':
    return True  # nothing to train
  return common.is_stage_complete(workdir, STAGE, config.autoencoder_train.num_steps)


def train(config, workdir) -> TrainState:
  """Train stage 1, resuming from the latest checkpoint in <workdir>/autoencoder."""
  from latent_diffusion import evaluate  # pylint: disable=g-import-not-at-top
  if config.autoencoder.kind == 'identity':
    raise ConfigError("autoencoder.kind='identity' has no first stage to train (train_diffusion diffuses "
                      'the pixels)')
  directory = common.stage_dir(workdir, STAGE)
  train_config = config.autoencoder_train
  if train_config.train_decoder_only and common.latest_step(workdir, STAGE) is None:
    raise ConfigError(f'autoencoder_train.train_decoder_only: no stage-1 checkpoint in {directory} to '
                      'fine-tune; its encoder would stay random (train stage 1 first, without it)')
  loop.write_config(directory, config)
  mesh = sharding.make_mesh(config.mesh)
  model, discriminator = build_autoencoder(config), build_discriminator(config)
  lpips_fn, lpips_params = make_perceptual(config)
  iterator, batches = common.make_batches(config, train_config.batch_size, mesh)
  checkpoints = common.stage_checkpoints(workdir, STAGE, train_config)
  tx = make_optimizer(config)
  abstract, shardings = abstract_state(model, config, mesh)
  disc_init_images = (common.preview_images(config, train_config.batch_size)
                      if config.autoencoder_loss.disc_use_actnorm else None)
  state, resumed = loop.restore_or_create(
      checkpoints, abstract, shardings,
      functools.partial(create_state, model, discriminator, config, tx=tx,
                        disc_init_images=disc_init_images),
      jax.random.PRNGKey(config.seed), iterator)
  if resumed:
    logging.info('autoencoder: resumed from step %d', int(state.step))
  logging.info('autoencoder: mesh %s, %s', dict(mesh.shape),
               sharding.describe_param_sharding(abstract.params, shardings.params))
  count = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
  logging.info('autoencoder: %s %d parameters, f=%d; discriminator %d parameters; LPIPS %s',
               config.autoencoder.kind, count(abstract.params['autoencoder']), model.downsampling_factor,
               count(abstract.params['discriminator']), 'on' if lpips_fn else 'off')

  jitted_step = jax.jit(
      functools.partial(train_step, model=model, discriminator=discriminator, lpips_fn=lpips_fn, tx=tx,
                        config=config, deterministic=config.autoencoder.dropout == 0.0),
      in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  step_fn = lambda state, batch: jitted_step(state, batch, lpips_params)

  sample_images = common.preview_images(config, train_config.num_sample_images)
  reconstruct = jax.jit(lambda params, x: model.apply({'params': params}, x)[0])
  writer = loop.make_writer(directory)

  def write_reconstructions(state, step):
    reconstructions = np.asarray(reconstruct(state.params['autoencoder'], sample_images))  # every process
    if jax.process_index() == 0:
      grid = np.concatenate([sample_images, np.clip(reconstructions, -1.0, 1.0)])
      path = image_io.save_grid(directory / 'samples' / f'reconstructions_{step:07d}.png', grid,
                                columns=len(sample_images))
      # TensorBoard: inputs on the top row, their reconstructions below.
      writer.write_images(step, {'reconstructions': image_io.make_grid(image_io.to_uint8(grid),
                                                                       len(sample_images))[None]})
      logging.info('autoencoder: wrote %s', path)

  evaluator = evaluate.Evaluator(config, model, perceptual=(lpips_fn, lpips_params)) \
      if train_config.eval_every_steps and evaluate.has_eval_split(config) else None

  def validate(state, step):
    results = evaluator(state.params['autoencoder'])
    writer.write_scalars(step, {f'val/{k}': v for k, v in results.items() if isinstance(v, (int, float))})
    logging.info('autoencoder step %d validation: %s', step, evaluate.describe(results))

  periodic = [(train_config.sample_every_steps, write_reconstructions)]
  if evaluator is not None:
    periodic.append((train_config.eval_every_steps, validate))
  try:
    return loop.run_steps(
        name='autoencoder', state=state, train_step=step_fn, batches=batches, iterator=iterator,
        checkpoints=checkpoints, writer=writer,
        total_steps=train_config.num_steps, log_every=config.log_every_steps,
        max_nonfinite_steps=config.max_nonfinite_steps, metrics_path=directory / 'metrics.jsonl',
        periodic=periodic)
  finally:
    checkpoints.close()
