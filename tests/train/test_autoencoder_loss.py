"""Tests for train/autoencoder_loss.py against the paper's own objective: taming-transformers'
VQLPIPSWithDiscriminator (which the paper's vq configs train with) run in PyTorch on the same
weights — paper-layout autoencoder, LPIPS with a random VGG16 trunk and the shipped heads, the
PatchGAN — comparing every logged term and the gradients of both optimizers' losses."""

import warnings

import jax
import numpy as np
import pytest
import torch
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
from taming.modules.losses import vqperceptual
from taming.modules.vqvae.quantize import VectorQuantizer2

from configs import base
from latent_diffusion.convert import autoencoder as convert
from latent_diffusion.models.discriminator import discriminator_params_from_state_dict
from latent_diffusion.models.lpips import LPIPS, lpips_params_from_state_dicts
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import autoencoder_loss

SIZE, DISC_START = 32, 5


def vq_config():
  config = base.get_config()
  config.data.image_size = SIZE
  c = config.autoencoder
  c.kind, c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions = 'vq', 32, (1, 2), 1, ()
  c.z_channels, c.embed_dim, c.double_z, c.n_embed = 3, 3, False, 16
  loss = config.autoencoder_loss
  loss.pixel_loss, loss.perceptual_weight, loss.codebook_weight = 'l1', 1.0, 1.0
  loss.disc_start, loss.disc_weight, loss.disc_num_layers, loss.disc_ndf = DISC_START, 0.75, 2, 16
  return config


def lpips_reference():
  import lpips  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)
    return lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False)


@pytest.fixture(scope='module')
def torch_and_jax_step():
  """One generator and one discriminator evaluation of the paper's objective, in both frameworks."""
  torch.manual_seed(0)
  config = vq_config()
  c = config.autoencoder
  ddconfig = dict(ch=c.ch, out_ch=3, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                  attn_resolutions=c.attn_resolutions, in_channels=3, resolution=SIZE,
                  z_channels=c.z_channels, double_z=False)
  model = torch.nn.ModuleDict({
      'encoder': TamingEncoder(**ddconfig), 'decoder': TamingDecoder(**ddconfig),
      'quant_conv': torch.nn.Conv2d(3, 3, 1), 'post_quant_conv': torch.nn.Conv2d(3, 3, 1),
      'quantize': VectorQuantizer2(c.n_embed, c.embed_dim, beta=0.25)})
  with torch.no_grad():  # codes spread over the latents' range, so several are used
    model.quantize.embedding.weight.normal_()
  original_lpips = vqperceptual.LPIPS
  vqperceptual.LPIPS = lpips_reference  # the pretrained download is impossible here
  try:
    loss = vqperceptual.VQLPIPSWithDiscriminator(
        disc_start=DISC_START, codebook_weight=1.0, disc_num_layers=2, disc_in_channels=3,
        disc_weight=0.75, perceptual_weight=1.0, disc_ndf=16)
  finally:
    vqperceptual.LPIPS = original_lpips
  disc_state_before = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}
  model_state = {k: v.clone() for k, v in model.state_dict().items()}

  images = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  quant, qloss, (_, _, indices) = model.quantize(model.quant_conv(model.encoder(x)))
  xrec = model.decoder(model.post_quant_conv(quant))
  aeloss, log = loss(qloss, x, xrec, 0, DISC_START, last_layer=model.decoder.conv_out.weight)
  aeloss.backward()
  torch_model_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
  loss.discriminator.zero_grad()
  discloss, disc_log = loss(qloss, x, xrec, 1, DISC_START)
  discloss.backward()
  torch_side = dict(loss=aeloss.item(), log={k.split('/')[1]: float(v) for k, v in {**log, **disc_log}.items()},
                    indices=indices.numpy(), model_grads=torch_model_grads,
                    disc_grads={n: p.grad.clone() for n, p in loss.discriminator.named_parameters()},
                    disc_state=loss.discriminator.state_dict())

  ours = stage1.build_autoencoder(config)
  abstract = jax.eval_shape(ours.init, jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3), np.float32))['params']
  params = convert.params_from_paper_state_dict(model_state, abstract)
  disc_params, disc_state = discriminator_params_from_state_dict(disc_state_before, use_actnorm=False,
                                                                 ndf=16, n_layers=2)
  reference = loss.perceptual_loss
  lpips_params = lpips_params_from_state_dicts(
      {name.replace(name.split('.')[0], 'features', 1): t for name, t in reference.net.state_dict().items()},
      {name: t for name, t in reference.state_dict().items() if name.startswith('lin')})
  perceptual = lambda a, b: LPIPS().apply({'params': lpips_params}, a, b)
  forward = stage1._forward(ours, 'vq', images, jax.random.PRNGKey(0), True)  # pylint: disable=protected-access
  grads, new_disc_state, jax_loss, metrics, _, aux = jax.jit(
      lambda: autoencoder_loss.generator_and_discriminator_grads(
          forward=forward, model_params=params, logvar=np.zeros((), np.float32), disc_params=disc_params,
          disc_state=disc_state, images=images, step=np.int32(DISC_START), kind='vq',
          loss_config=config.autoencoder_loss, perceptual_fn=perceptual,
          disc_apply=stage1._disc_apply(stage1.build_discriminator(config))))()  # pylint: disable=protected-access
  jax_side = dict(loss=float(jax_loss), metrics=jax.device_get(metrics), indices=np.asarray(aux['indices']),
                  grads=jax.device_get(grads), disc_state=jax.device_get(new_disc_state))
  return torch_side, jax_side, abstract


def test_logged_terms_equal_the_papers_loss(torch_and_jax_step):
  torch_side, jax_side, _ = torch_and_jax_step
  log, metrics = torch_side['log'], jax_side['metrics']
  assert log['d_weight'] > 0 and log['disc_factor'] == 1.0
  np.testing.assert_array_equal(jax_side['indices'].reshape(-1), torch_side['indices'].reshape(-1))
  np.testing.assert_allclose(jax_side['loss'], torch_side['loss'], rtol=1e-5)
  for ours, paper in (('nll_loss', 'nll_loss'), ('quant_loss', 'quant_loss'), ('p_loss', 'p_loss'),
                      ('g_loss', 'g_loss'), ('d_weight', 'd_weight'), ('disc_loss', 'disc_loss'),
                      ('logits_real', 'logits_real'), ('logits_fake', 'logits_fake'),
                      ('rec_loss', 'rec_loss')):
    np.testing.assert_allclose(metrics[ours], log[paper], rtol=2e-4, err_msg=ours)


def assert_trees_close(actual, expected, rtol=2e-3, atol_fraction=1e-5):
  scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(expected))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_fraction * scale),
               actual, expected)


def test_autoencoder_gradients_equal_the_papers(torch_and_jax_step):
  torch_side, jax_side, abstract = torch_and_jax_step
  expected = convert.params_from_paper_state_dict(torch_side['model_grads'], abstract)
  assert_trees_close(jax_side['grads']['autoencoder'], expected)


def test_discriminator_gradients_and_running_statistics_equal_the_papers(torch_and_jax_step):
  torch_side, jax_side, _ = torch_and_jax_step
  with_grads = {**torch_side['disc_state'], **torch_side['disc_grads']}  # grads in place of weights
  expected_grads, _ = discriminator_params_from_state_dict(with_grads, use_actnorm=False, ndf=16, n_layers=2)
  _, expected_state = discriminator_params_from_state_dict(torch_side['disc_state'], use_actnorm=False,
                                                           ndf=16, n_layers=2)
  assert_trees_close(jax_side['grads']['discriminator'], expected_grads)
  assert_trees_close(jax_side['disc_state'], expected_state, rtol=1e-4)
