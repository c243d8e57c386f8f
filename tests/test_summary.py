"""Tests for summary.py: parameter counts without allocating weights, summary.json."""

import importlib
import json

import pytest
import torch
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
from taming.modules.discriminator.model import NLayerDiscriminator as TamingDiscriminator
from taming.modules.vqvae.quantize import VectorQuantizer2

from configs import default, lsun_churches_f8
from latent_diffusion import summary

PAPER_FIRST_STAGES = ('kl_f4', 'kl_f8', 'kl_f16', 'kl_f32', 'vq_f4', 'vq_f4_noattn', 'vq_f8',
                      'vq_f8_n256', 'vq_f16')

# Counts of the paper's own modules (CompVis/latent-diffusion: ldm.models.autoencoder.AutoencoderKL
# with the kl-f8 ddconfig, openaimodel.UNetModel with lsun_churches-ldm-kl-8's unet_config),
# obtained by instantiating them in PyTorch; test_every_paper_ldm_config_... below builds them live.
CHURCHES_AUTOENCODER = 83_653_863
CHURCHES_UNET = 294_966_916

# The unet_config of every released LDM (configs/latent-diffusion/*.yaml and models/ldm/*/config.yaml
# of the paper's repository), by our config that reproduces it.
PAPER_LDM_UNETS = {
    'celebahq_f4': dict(in_channels=3, out_channels=3, model_channels=224, attention_resolutions=[8, 4, 2],
                        num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_head_channels=32),
    'lsun_churches_f8': dict(in_channels=4, out_channels=4, model_channels=192,
                             attention_resolutions=[1, 2, 4, 8], num_res_blocks=2, channel_mult=[1, 2, 2, 4, 4],
                             num_heads=8, use_scale_shift_norm=True, resblock_updown=True),
    'cin_f8': dict(in_channels=4, out_channels=4, model_channels=256, attention_resolutions=[4, 2, 1],
                   num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=32, use_spatial_transformer=True,
                   transformer_depth=1, context_dim=512),
    'cin256_v2': dict(in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
                      num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
                      transformer_depth=1, context_dim=512),
}
PAPER_LDM_UNETS['ffhq_f4'] = PAPER_LDM_UNETS['lsun_bedrooms_f4'] = PAPER_LDM_UNETS['celebahq_f4']
# The conditional ones of models/ldm/*/config.yaml and configs/latent-diffusion/txt2img-1p4B-eval.yaml.
PAPER_LDM_UNETS.update({
    'text2img256': dict(in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
                        num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_head_channels=32,
                        use_spatial_transformer=True, transformer_depth=1, context_dim=640),
    'txt2img_1p4b': dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                         num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                         transformer_depth=1, context_dim=1280, legacy=False),
    'layout2img_openimages256': dict(in_channels=3, out_channels=3, model_channels=128,
                                     attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                                     num_head_channels=32, use_spatial_transformer=True, transformer_depth=3,
                                     # one per block: the sdkit (SD 2) SpatialTransformer indexes it by depth
                                     context_dim=[512] * 3),
    'semantic_synthesis256': dict(in_channels=6, out_channels=3, model_channels=128,
                                  attention_resolutions=[32, 16, 8], num_res_blocks=2, channel_mult=[1, 4, 8],
                                  num_heads=8),
    'bsr_sr': dict(in_channels=6, out_channels=3, model_channels=160, attention_resolutions=[16, 8],
                   num_res_blocks=2, channel_mult=[1, 2, 2, 4], num_head_channels=32),
    'inpainting_big': dict(in_channels=7, out_channels=3, model_channels=256, attention_resolutions=[8, 4, 2],
                           num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_heads=8, resblock_updown=True),
})
PAPER_LDM_UNETS['semantic_synthesis512'] = PAPER_LDM_UNETS['semantic_synthesis256']
PAPER_LDM_UNETS['cin256'] = PAPER_LDM_UNETS['cin_f8']
# The paper's ClassEmbedder rows (n_classes) of the class-conditional ones.
PAPER_LDM_CLASSES = {'cin_f8': 1000, 'cin256': 1000, 'cin256_v2': 1001}
# Their BERTEmbedder / TransformerEmbedder (n_embed, n_layer, vocab_size, max_seq_len) and SpatialRescaler
# (n_stages, in_channels, out_channels); bsr_sr's identity and inpainting_big's first stage have none.
PAPER_LDM_TRANSFORMERS = {'text2img256': (640, 32, 30522, 77), 'txt2img_1p4b': (1280, 32, 30522, 77),
                          'layout2img_openimages256': (512, 16, 8192, 92)}
PAPER_LDM_RESCALERS = {'semantic_synthesis256': (2, 182, 3), 'semantic_synthesis512': (2, 182, 3)}


@pytest.fixture(scope='module')
def churches():
  return summary.network_parameters(lsun_churches_f8.get_config())


def test_network_parameters_of_lsun_churches_equal_the_papers_models(churches):
  assert churches['autoencoder']['parameters'] == CHURCHES_AUTOENCODER
  assert churches['unet']['parameters'] == CHURCHES_UNET


def test_network_parameters_report_input_shapes(churches):
  assert churches['autoencoder']['input'] == [1, 256, 256, 3]
  assert churches['unet']['input'] == [1, 32, 32, 4]  # f = 8 latents


def test_parts_add_up_to_the_total(churches):
  for info in churches.values():
    assert sum(info['parts'].values()) == info['parameters']
  assert set(churches['autoencoder']['parts']) == {'encoder', 'decoder', 'quant_conv',
                                                   'post_quant_conv'}


def test_count_parameters_sums_leaf_sizes():
  import numpy as np  # pylint: disable=g-import-not-at-top
  tree = {'a': np.zeros((3, 4)), 'b': [np.zeros(5), np.zeros(())]}
  assert summary.count_parameters(tree) == 12 + 5 + 1


def test_summarize_prints_a_table_and_writes_integer_counts(tmp_path, capsys):
  config = default.get_config()
  counts = summary.summarize(config, tmp_path / 'work')
  written = json.loads((tmp_path / 'work' / 'summary.json').read_text())
  assert written == counts
  assert set(written) == {'autoencoder', 'discriminator', 'unet'}
  assert all(isinstance(v, int) and v > 0 for v in written.values())
  output = capsys.readouterr().out
  assert f'{counts["unet"]:,}' in output and f'{counts["autoencoder"]:,}' in output
  assert 'summary.json' in output


def taming_first_stage(config) -> torch.nn.Module:
  """The paper's first-stage model and its loss's discriminator for a config, assembled from the
  taming-transformers modules that the paper's code uses (on the meta device: shapes only)."""
  c, kind = config.autoencoder, config.autoencoder.kind
  ddconfig = dict(ch=c.ch, out_ch=c.out_ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                  attn_resolutions=tuple(c.attn_resolutions), in_channels=c.in_channels,
                  resolution=config.data.image_size, z_channels=c.z_channels)
  double = 2 if kind == 'kl' else 1
  with torch.device('meta'):
    model = torch.nn.ModuleDict({
        'encoder': TamingEncoder(double_z=c.double_z, **ddconfig), 'decoder': TamingDecoder(**ddconfig),
        'quant_conv': torch.nn.Conv2d(double * c.z_channels, double * c.embed_dim, 1),
        'post_quant_conv': torch.nn.Conv2d(c.embed_dim, c.z_channels, 1)})
    if kind == 'vq':
      model['quantize'] = VectorQuantizer2(c.n_embed, c.embed_dim, beta=0.25)
    discriminator = TamingDiscriminator(input_nc=3, ndf=config.autoencoder_loss.disc_ndf,
                                        n_layers=config.autoencoder_loss.disc_num_layers)
  if c.attn_type == 'none':  # the paper's make_attn(..., 'none') is an nn.Identity
    model.encoder.mid.attn_1 = model.decoder.mid.attn_1 = torch.nn.Identity()
  return model, discriminator


@pytest.mark.parametrize('name', PAPER_FIRST_STAGES)
def test_every_paper_first_stage_config_builds_with_the_papers_parameter_count(name):
  config = importlib.import_module(f'configs.autoencoder.{name}').get_config()
  networks = summary.network_parameters(config)
  model, discriminator = taming_first_stage(config)
  assert networks['autoencoder']['parameters'] == sum(p.numel() for p in model.parameters())
  assert networks['discriminator']['parameters'] == sum(p.numel() for p in discriminator.parameters())


# ffhq_f4 and lsun_bedrooms_f4 share celebahq_f4's U-Net (configs.paper_ldm.UNET_VQ_F4), cin_f8 has
# cin256_v2's kind of model, and lsun_churches_f8's U-Net count is also checked above: slow only.
_SLOW_LDMS = ('ffhq_f4', 'lsun_bedrooms_f4', 'cin_f8', 'lsun_churches_f8', 'cin256', 'semantic_synthesis512',
              'txt2img_1p4b')  # the last: text2img256's kind of model, 1.45B parameters


@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow) if name in _SLOW_LDMS else name
                                  for name in sorted(PAPER_LDM_UNETS)])
def test_every_paper_ldm_config_builds_with_the_papers_parameter_counts(name):
  from ldm.modules.diffusionmodules.openaimodel import UNetModel as PaperUNet  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  networks = summary.network_parameters(config)
  with torch.device('meta'):
    unet = PaperUNet(image_size=32, **PAPER_LDM_UNETS[name])
    cond_stage = paper_cond_stage(name)
  assert networks['unet']['parameters'] == sum(p.numel() for p in unet.parameters())
  if cond_stage is not None:
    assert networks['cond_stage']['parameters'] == sum(p.numel() for p in cond_stage.parameters())
  else:
    assert 'cond_stage' not in networks


def paper_cond_stage(name):
  """The paper's cond_stage_model of a released LDM (x-transformers 0.10.2 is its vendored
  x_transformer), or None."""
  if name in PAPER_LDM_CLASSES:
    return torch.nn.Embedding(PAPER_LDM_CLASSES[name], 512)  # the paper's ClassEmbedder
  if name in PAPER_LDM_TRANSFORMERS:
    import x_transformers  # pylint: disable=g-import-not-at-top
    n_embed, n_layer, vocab_size, max_seq_len = PAPER_LDM_TRANSFORMERS[name]
    return x_transformers.TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                             attn_layers=x_transformers.Encoder(dim=n_embed, depth=n_layer))
  if name in PAPER_LDM_RESCALERS:
    # The paper's SpatialRescaler holds one module with parameters, channel_mapper =
    # Conv2d(in, out, 1, bias=False) (its resizing has none); sdkit's copy imports open_clip.
    _, in_channels, out_channels = PAPER_LDM_RESCALERS[name]
    return torch.nn.ModuleDict({'channel_mapper': torch.nn.Conv2d(in_channels, out_channels, 1, bias=False)})
  return None
