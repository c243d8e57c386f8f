"""Tests for convert/autoencoder.py: diffusers and paper-layout (taming-transformers) checkpoints, converted and
run beside the PyTorch models they came from; errors."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import VQModel as DiffusersVQModel
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
from taming.modules.vqvae.quantize import VectorQuantizer2

from latent_diffusion.convert import autoencoder as convert
from latent_diffusion.errors import CheckpointError
from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel

SIZE = 16  # image side for every forward pass: full-width models stay fast on CPU


def abstract_params(model, size=SIZE):
  image = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), image)['params']


def count(params):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def random_module(build, seed):
  """build() with every tensor random, GroupNorm affine and biases included, at scales that keep
  activations O(1): weights N(0, 1/fan_in), norm scales N(1, 0.1^2), biases and norm offsets
  N(0, 0.1^2). Built on the meta device first: PyTorch's own initialisation would be thrown away."""
  with torch.device('meta'):
    module = build()
  module.to_empty(device='cpu')
  assert not list(module.buffers())  # every tensor is a parameter, so every tensor is set below
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in module.named_parameters():
      if parameter.ndim > 1:
        parameter.normal_(0.0, 1.0 / math.sqrt(math.prod(parameter.shape[1:])), generator=generator)
      elif name.endswith('weight'):
        parameter.normal_(1.0, 0.1, generator=generator)
      else:
        parameter.normal_(0.0, 0.1, generator=generator)
  return module.eval()


def state_dict_of(module):
  return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def to_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(actual, expected, tolerance=1e-4):
  """Equal to `tolerance`, relative to the largest magnitude of `expected` where that exceeds 1."""
  expected = np.asarray(expected)
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=tolerance, atol=tolerance * scale)


def images(seed, batch):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)


def block_types(levels, attention_levels):
  """diffusers block types; decoder blocks are listed from the lowest resolution up."""
  down = tuple('AttnDownEncoderBlock2D' if i in attention_levels else 'DownEncoderBlock2D'
               for i in range(levels))
  up = tuple('AttnUpDecoderBlock2D' if i in attention_levels else 'UpDecoderBlock2D'
             for i in reversed(range(levels)))
  return dict(down_block_types=down, up_block_types=up)


def our_fields(block_out_channels, layers_per_block, attention_levels):
  """Our Encoder/Decoder fields for a diffusers configuration at image side SIZE."""
  ch = block_out_channels[0]
  return dict(ch=ch, ch_mult=tuple(c // ch for c in block_out_channels),
              num_res_blocks=layers_per_block, resolution=SIZE, norm_num_groups=32,
              attn_resolutions=tuple(SIZE // 2 ** level for level in attention_levels))


# diffusers parity: AutoencoderKL.

# One image for the full-width models (they dominate this file's run time), two for the others.
FULL_WIDTH = ('kl-f8', 'vq-f4')

KL_CASES = {
    # name: (block_out_channels, layers_per_block, latent_channels, attention levels)
    'kl-f8': ((128, 256, 512, 512), 2, 4, ()),
    # kl-f16's attn_resolutions as attention blocks at levels; levels 0 and 2 of 3 are diffusers'
    # up_blocks 2 and 0, so its reversed numbering is exercised.
    'attention_at_two_levels': ((32, 64, 128), 1, 16, (0, 2)),
    'three_resnets_per_level': ((64, 128), 3, 3, ()),
}


@pytest.fixture(scope='module', params=sorted(KL_CASES))
def kl_outputs(request):
  """(ours, diffusers'): posterior mean and logvar of the same images, decodings of the same z."""
  block_out_channels, layers_per_block, latent_channels, attention_levels = KL_CASES[request.param]
  reference = random_module(lambda: DiffusersAutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=block_out_channels,
      layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=32,
      sample_size=SIZE, **block_types(len(block_out_channels), attention_levels)), seed=1)
  model = AutoencoderKL(z_channels=latent_channels, embed_dim=latent_channels,
                        **our_fields(block_out_channels, layers_per_block, attention_levels))
  assert convert.detect_format(state_dict_of(reference)) == 'diffusers'
  params = convert.params_from_diffusers_state_dict(state_dict_of(reference), abstract_params(model))
  x = images(0, batch=1 if request.param in FULL_WIDTH else 2)
  latent_side = SIZE // model.downsampling_factor
  z = np.random.default_rng(1).normal(size=(len(x), latent_side, latent_side, latent_channels))
  z = z.astype(np.float32)

  def forward(m, x, z):
    posterior = m.encode(x)
    return {'mean': posterior.mean, 'logvar': posterior.logvar, 'decoded': m.decode(z)}

  ours = jax.jit(lambda p, x, z: model.apply({'params': p}, x, z, method=forward))(params, x, z)
  with torch.no_grad():
    posterior = reference.encode(to_nchw(x)).latent_dist
    expected = {'mean': to_nhwc(posterior.mean), 'logvar': to_nhwc(posterior.logvar),
                'decoded': to_nhwc(reference.decode(to_nchw(z)).sample)}
  return ours, expected


def test_kl_posterior_mean_and_logvar_match_diffusers(kl_outputs):
  ours, expected = kl_outputs
  assert ours['mean'].shape == expected['mean'].shape
  assert_close(ours['mean'], expected['mean'])
  assert_close(ours['logvar'], expected['logvar'])


def test_kl_decoding_matches_diffusers(kl_outputs):
  ours, expected = kl_outputs
  assert ours['decoded'].shape == expected['decoded'].shape
  assert np.abs(expected['decoded']).std() > 0.1  # random weights give a non-trivial image
  assert_close(ours['decoded'], expected['decoded'])


# diffusers parity: VQModel.

VQ_CASES = {
    # name: (block_out_channels, layers_per_block, latent_channels, num_vq_embeddings, vq_embed_dim,
    #        attention levels, mid-block attention)
    'vq-f4': ((128, 256, 512), 2, 3, 8192, 3, (), True),
    # vq-f4-noattn: no attention anywhere = our attn_type 'none'.
    'no_mid_attention': ((32, 64), 1, 3, 256, 3, (), False),
    # vq-f8's attn_resolutions as attention blocks at a level (diffusers' last up_block), and
    # quant_conv narrowing latent_channels 4 to vq_embed_dim 3.
    'attention_at_a_level': ((32, 64, 64), 1, 4, 512, 3, (0,), True),
}


def calibrate_codebook_(reference, x):
  """A codebook spread like the encoder's latents, so random weights use many codes."""
  generator = torch.Generator().manual_seed(2)
  with torch.no_grad():
    latents = reference.encode(to_nchw(x)).latents
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    weight = reference.quantize.embedding.weight
    weight.copy_(mean + std * torch.randn(weight.shape, generator=generator))


@pytest.fixture(scope='module', params=sorted(VQ_CASES))
def vq_outputs(request):
  """(ours, diffusers'): pre-quantisation latents and code indices of the same images, decodings
  (quantised first) of diffusers' latents."""
  (block_out_channels, layers_per_block, latent_channels, n_embed, embed_dim, attention_levels,
   mid_attention) = VQ_CASES[request.param]
  reference = random_module(lambda: DiffusersVQModel(
      in_channels=3, out_channels=3, block_out_channels=block_out_channels,
      layers_per_block=layers_per_block, latent_channels=latent_channels,
      num_vq_embeddings=n_embed, vq_embed_dim=embed_dim, norm_num_groups=32, sample_size=SIZE,
      mid_block_add_attention=mid_attention,
      **block_types(len(block_out_channels), attention_levels)), seed=1)
  x = images(3, batch=1 if request.param in FULL_WIDTH else 2)
  calibrate_codebook_(reference, x)
  model = VQModel(n_embed=n_embed, embed_dim=embed_dim, z_channels=latent_channels,
                  attn_type='vanilla' if mid_attention else 'none',
                  **our_fields(block_out_channels, layers_per_block, attention_levels))
  params = convert.params_from_diffusers_state_dict(state_dict_of(reference), abstract_params(model))
  with torch.no_grad():
    latents = reference.encode(to_nchw(x)).latents
    expected = {'latents': to_nhwc(latents),
                'indices': reference.quantize(latents)[2][2].numpy().reshape(latents.shape[0], -1),
                'decoded': to_nhwc(reference.decode(latents).sample)}

  def forward(m, x, h):
    return {'latents': m.encode_moments(x), 'indices': m.encode(x)[2], 'decoded': m.decode(h)}

  ours = jax.jit(lambda p, x, h: model.apply({'params': p}, x, h, method=forward))(
      params, x, expected['latents'])
  return ours, expected


def test_vq_latents_match_diffusers(vq_outputs):
  ours, expected = vq_outputs
  assert ours['latents'].shape == expected['latents'].shape
  assert_close(ours['latents'], expected['latents'])


def test_vq_code_indices_equal_diffusers(vq_outputs):
  ours, expected = vq_outputs
  indices = np.asarray(ours['indices']).reshape(expected['indices'].shape)
  np.testing.assert_array_equal(indices, expected['indices'])
  assert len(np.unique(indices)) > indices.size // 4  # many codes in use: the check is not vacuous


def test_vq_decoding_matches_diffusers(vq_outputs):
  ours, expected = vq_outputs
  assert ours['decoded'].shape == expected['decoded'].shape
  assert_close(ours['decoded'], expected['decoded'])


# Paper layout, through taming-transformers' modules (the paper's own key names), from a .ckpt file.

PAPER_CASES = {
    'kl': dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4,
               embed_dim=3),
    'vq': dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(), z_channels=4,
               embed_dim=3, n_embed=64),
}


def taming_first_stage(kind, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, embed_dim,
                       n_embed=None, resolution=SIZE):
  """The paper's AutoencoderKL / VQModel submodules under their state-dict names."""
  ddconfig = dict(ch=ch, out_ch=3, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                  attn_resolutions=attn_resolutions, in_channels=3, resolution=resolution,
                  z_channels=z_channels)
  double = 2 if kind == 'kl' else 1
  modules = {'encoder': TamingEncoder(double_z=kind == 'kl', **ddconfig),
             'decoder': TamingDecoder(**ddconfig),
             'quant_conv': torch.nn.Conv2d(double * z_channels, double * embed_dim, 1),
             'post_quant_conv': torch.nn.Conv2d(embed_dim, z_channels, 1)}
  if kind == 'vq':
    modules['quantize'] = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
  return torch.nn.ModuleDict(modules).eval()


def our_model(kind, **settings):
  return (AutoencoderKL if kind == 'kl' else VQModel)(resolution=settings.pop('resolution', SIZE),
                                                      **settings)


@pytest.fixture(scope='module', params=sorted(PAPER_CASES))
def paper_checkpoint(request, tmp_path_factory):
  """(kind, settings, taming reference, path of a Lightning-style .ckpt holding its weights)."""
  kind, settings = request.param, PAPER_CASES[request.param]
  reference = random_module(lambda: taming_first_stage(kind, **settings), seed=4)
  if kind == 'vq':  # a codebook spread like the latents, as calibrate_codebook_
    with torch.no_grad():
      latents = reference.quant_conv(reference.encoder(to_nchw(images(5, batch=2))))
      weight = reference.quantize.embedding.weight
      noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
      weight.copy_(latents.mean() + latents.std() * noise)
  state_dict = dict(reference.state_dict())
  state_dict.update({'loss.logvar': torch.zeros(()),
                     'loss.discriminator.main.0.weight': torch.ones(64, 3, 4, 4),
                     'loss.perceptual_loss.lin0.model.1.weight': torch.ones(1, 64, 1, 1),
                     'model_ema.decay': torch.tensor(0.9999)})
  path = tmp_path_factory.mktemp('paper') / f'{kind}.ckpt'
  torch.save({'state_dict': state_dict, 'epoch': 3, 'global_step': 1000}, path)
  return kind, settings, reference, path


def test_paper_checkpoint_matches_taming_modules(paper_checkpoint):
  kind, settings, reference, path = paper_checkpoint
  model = our_model(kind, **settings)
  params = convert.load_autoencoder_params(path, abstract_params(model))
  x = images(5, batch=2)
  latent_side = SIZE // model.downsampling_factor
  z = np.random.default_rng(6).normal(size=(2, latent_side, latent_side, settings['embed_dim']))
  z = z.astype(np.float32)

  def forward(m, x, z):
    if kind == 'kl':
      return {'moments': m.encode_moments(x), 'decoded': m.decode(z)}
    quantized, _, indices = m.encode(x)
    return {'moments': m.encode_moments(x), 'indices': indices,
            'decoded': m.decode(quantized, force_not_quantize=True)}

  ours = jax.jit(lambda p, x, z: model.apply({'params': p}, x, z, method=forward))(params, x, z)
  with torch.no_grad():
    moments = reference.quant_conv(reference.encoder(to_nchw(x)))
    assert_close(ours['moments'], to_nhwc(moments))
    if kind == 'kl':
      decoded = reference.decoder(reference.post_quant_conv(to_nchw(z)))
    else:
      quantized, _, (_, _, indices) = reference.quantize(moments)
      decoded = reference.decoder(reference.post_quant_conv(quantized))
      np.testing.assert_array_equal(np.asarray(ours['indices']).reshape(-1), indices.numpy())
      assert len(np.unique(indices.numpy())) > 8
  assert_close(ours['decoded'], to_nhwc(decoded))


@pytest.fixture(scope='module')
def kl_paper():
  """(paper-layout state dict of the 'kl' case, our abstract params for it)."""
  state_dict = state_dict_of(random_module(lambda: taming_first_stage('kl', **PAPER_CASES['kl']),
                                           seed=8))
  return state_dict, abstract_params(our_model('kl', **PAPER_CASES['kl']))


def test_paper_state_dict_ignores_loss_and_ema_entries(kl_paper):
  state_dict, abstract = kl_paper
  plain = convert.params_from_paper_state_dict(state_dict, abstract)
  extra = {'loss.logvar': np.zeros(()), 'model_ema.num_updates': np.array(5),
           'model_ema.encoderconv_inweight': np.ones((32, 3, 3, 3), np.float32)}
  with_training_state = convert.params_from_paper_state_dict({**state_dict, **extra}, abstract)
  jax.tree.map(np.testing.assert_array_equal, with_training_state, plain)
  kernel = plain['encoder']['conv_in']['kernel']
  np.testing.assert_array_equal(kernel, state_dict['encoder.conv_in.weight'].transpose(2, 3, 1, 0))


def test_full_ldm_checkpoint_gives_its_first_stage_model(kl_paper):
  state_dict, abstract = kl_paper
  ldm = {f'first_stage_model.{key}': value for key, value in state_dict.items()}
  ldm.update({'model.diffusion_model.input_blocks.0.0.weight': np.ones((8, 3, 3, 3), np.float32),
              'cond_stage_model.embedding.weight': np.ones((10, 8), np.float32)})
  assert convert.detect_format(ldm) == 'paper'
  jax.tree.map(np.testing.assert_array_equal, convert.params_from_paper_state_dict(ldm, abstract),
               convert.params_from_paper_state_dict(state_dict, abstract))


# Errors a user can cause.


def test_shape_mismatch_names_parameter_key_and_both_shapes(kl_paper):
  state_dict, _ = kl_paper
  settings = {**PAPER_CASES['kl'], 'z_channels': 8}  # the checkpoint has 4
  abstract = abstract_params(our_model('kl', **settings))
  # decoder/conv_in is the first parameter (in tree order) that z_channels shapes.
  lowest_width = settings['ch'] * settings['ch_mult'][-1]
  checkpoint_shape = state_dict['decoder.conv_in.weight'].shape
  with pytest.raises(CheckpointError) as error:
    convert.params_from_paper_state_dict(state_dict, abstract)
  message = str(error.value)
  assert 'decoder/conv_in/kernel' in message and 'decoder.conv_in.weight' in message
  assert str(tuple(checkpoint_shape)) in message and str((lowest_width, 8, 3, 3)) in message
  assert '\n' not in message


def test_diffusers_shape_mismatch_names_parameter_key_and_both_shapes():
  reference = random_module(lambda: DiffusersVQModel(
      block_out_channels=(32, 64), layers_per_block=1, latent_channels=3, num_vq_embeddings=16,
      vq_embed_dim=3, norm_num_groups=32, **block_types(2, ())), seed=9)
  model = VQModel(n_embed=32, embed_dim=3, z_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                  resolution=SIZE)
  with pytest.raises(CheckpointError, match=r'quantize/embedding \(quantize\.embedding\.weight\) '
                                            r'has shape \(16, 3\) .* needs \(32, 3\)'):
    convert.params_from_diffusers_state_dict(state_dict_of(reference), abstract_params(model))


def test_missing_key_is_named(kl_paper):
  state_dict, abstract = kl_paper
  state_dict = dict(state_dict)
  del state_dict['encoder.mid.attn_1.q.weight']
  with pytest.raises(CheckpointError, match=r'lacks encoder\.mid\.attn_1\.q\.weight '
                                            r'\(for encoder/mid_attn_1/q/kernel\)'):
    convert.params_from_paper_state_dict(state_dict, abstract)


def test_unexpected_key_is_named(kl_paper):
  state_dict, _ = kl_paper
  # A config without attention at 8 px leaves the checkpoint's attention blocks unused.
  abstract = abstract_params(our_model('kl', **{**PAPER_CASES['kl'], 'attn_resolutions': ()}))
  with pytest.raises(CheckpointError, match=r'has decoder\.up\.1\.attn\.0\.k\.bias and \d+ more, '
                                            r'which the model does not use'):
    convert.params_from_paper_state_dict(state_dict, abstract)


def test_unrelated_state_dict_names_the_expected_layouts(kl_paper, tmp_path):
  unet = {'model.diffusion_model.input_blocks.0.0.weight': torch.ones(8, 4, 3, 3),
          'model.diffusion_model.out.2.bias': torch.ones(4)}
  path = tmp_path / 'unet.pth'
  torch.save(unet, path)
  with pytest.raises(CheckpointError) as error:
    convert.load_autoencoder_params(path, kl_paper[1])
  message = str(error.value)
  assert str(path) in message
  assert 'encoder.down.0.block.0' in message and 'encoder.down_blocks.0.resnets.0' in message
  assert 'model.diffusion_model.input_blocks.0.0.weight' in message


def test_missing_file_is_named(tmp_path):
  path = tmp_path / 'absent' / 'model.ckpt'
  with pytest.raises(CheckpointError, match=re.escape(f'{path} does not exist')):
    convert.load_autoencoder_params(path, {})


def test_directory_without_diffusers_weights_is_named(tmp_path):
  with pytest.raises(CheckpointError, match=re.escape(f'{tmp_path} holds no diffusion_pytorch_model')):
    convert.load_autoencoder_params(tmp_path, {})


# diffusers files and older key names.


@pytest.fixture(scope='module')
def small_diffusers_kl():
  """(diffusers AutoencoderKL with attention at its second level, its state dict, our abstract
  params)."""
  reference = random_module(lambda: DiffusersAutoencoderKL(
      block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
      **block_types(2, (1,))), seed=7)
  model = AutoencoderKL(z_channels=4, embed_dim=4, **our_fields((32, 64), 1, (1,)))
  return reference, state_dict_of(reference), abstract_params(model)


def test_diffusers_model_directory_loads_like_its_state_dict(small_diffusers_kl, tmp_path):
  reference, state_dict, abstract = small_diffusers_kl
  reference.save_pretrained(tmp_path / 'vae')  # diffusion_pytorch_model.safetensors + config.json
  from_directory = convert.load_autoencoder_params(tmp_path, abstract)  # a pipeline's vae/ is found
  jax.tree.map(np.testing.assert_array_equal, from_directory,
               convert.params_from_diffusers_state_dict(state_dict, abstract))


def test_old_diffusers_attention_names_convert_like_new_ones(small_diffusers_kl):
  _, state_dict, abstract = small_diffusers_kl
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  old = {}
  for key, value in state_dict.items():
    for new_name, old_name in renames.items():
      key = key.replace(f'.{new_name}.', f'.{old_name}.')
    old[key] = value
  assert 'decoder.mid_block.attentions.0.proj_attn.weight' in old
  jax.tree.map(np.testing.assert_array_equal, convert.params_from_diffusers_state_dict(old, abstract),
               convert.params_from_diffusers_state_dict(state_dict, abstract))
