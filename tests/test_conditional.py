"""Every conditional task through main.run on the synthetic set (tiny networks, 16x16 images): stage 2
trains with text, layout, semantic-map, super-resolution and inpainting conditions, and sample mode
draws from command-line conditions, writing a [condition | sample] grid and the single PNGs.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import tiny_config
from latent_diffusion import main, sample_inputs
from latent_diffusion.errors import ConfigError, DataError
from tests.conftest import write_folder


def conditional_config(task: str, mode: str = 'train_diffusion'):
  config = tiny_config.get_config()
  config.mode = mode
  config.diffusion_train.num_steps = 2
  # A training grid with conditions for one task (the other tasks share its code).
  config.diffusion_train.sample_every_steps = 2 if task == 'text' else 0
  config.sample.num_samples = 3  # one padded batch of 2 + 1
  config.diffusion_train.checkpoint_every_steps = 2  # the final save only
  unet, cond = config.unet, config.cond_stage
  # One level: the conditions reach the middle block (where the cross-attention is), and the U-Net
  # compiles in about half the time of the two-level one.
  unet.channel_mult, unet.attention_resolutions = (1,), ()
  if task in ('text', 'layout'):
    unet.use_spatial_transformer, unet.context_dim, unet.num_head_channels = True, 32, 16
    config.diffusion.conditioning_key = 'crossattn'
    config.diffusion.cond_drop_prob = 0.2
    config.sample.guidance_scale = 2.0
    cond.kind, cond.n_embed, cond.n_layer = 'transformer', 32, 1
    if task == 'text':
      cond.key, cond.tokenizer, cond.vocab_size, cond.max_seq_len = 'caption', 'word', 64, 24
    else:
      cond.key, cond.vocab_size, cond.max_seq_len = 'layout', 1024, 11
      cond.layout_max_objects, cond.layout_encode_crop = 3, True
  else:
    config.diffusion.conditioning_key = 'concat'
  if task == 'semantic':
    unet.in_channels = 4 + 3
    cond.kind, cond.key = 'spatial_rescaler', 'segmentation'
    cond.n_stages, cond.in_channels, cond.out_channels = 1, 7, 3
  elif task == 'sr':
    unet.in_channels = 4 + 3
    config.data.low_res_size = 8  # 16 -> 8: the 8x8 latent side
    cond.kind, cond.key = 'identity', 'low_res'
  elif task == 'inpaint':
    unet.in_channels = 4 + 4 + 1
    config.data.inpainting_masks = True
    cond.kind, cond.key = 'first_stage', 'masked_image'
    cond.scale_first_stage = True           # as configs/utkface_inpaint.py
    config.sample.keep_known_latents = True
  return config


@pytest.fixture(scope='module')
def stage1_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('stage1')
  config = tiny_config.get_config()
  config.mode = 'train_autoencoder'
  config.autoencoder_train.num_steps = 2
  config.autoencoder_train.checkpoint_every_steps, config.autoencoder_train.eval_every_steps = 2, 0
  main.run(config, str(workdir))
  return workdir


def workdir_with_stage1(stage1_workdir, tmp_path):
  shutil.copytree(stage1_workdir / 'autoencoder', tmp_path / 'autoencoder')
  return tmp_path


def write_inputs(task, directory):
  """The command-line condition of each task, as files where it is one."""
  if task == 'text':
    return {'prompt': 'a red circle left of a blue square | a green star'}
  if task == 'layout':
    path = directory / 'layout.json'
    path.write_text(json.dumps([{'class': 'circle', 'box': [0.1, 0.1, 0.5, 0.5]},
                                {'class': 3, 'box': [0.5, 0.4, 0.9, 0.9]}]))
    return {'layout': str(path)}
  if task == 'semantic':
    segmentation = np.zeros((32, 32), np.uint8)  # twice the training size: convolutional sampling
    segmentation[4:14, 4:14], segmentation[18:30, 10:28] = 1, 5
    Image.fromarray(segmentation, 'L').save(directory / 'map.png')
    return {'segmentation': str(directory / 'map.png')}
  rng = np.random.default_rng(0)
  if task == 'sr':
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(directory / 'low.png')
    return {'image': str(directory / 'low.png')}
  Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(directory / 'face.png')
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 6:14] = 255
  Image.fromarray(mask, 'L').save(directory / 'mask.png')
  return {'image': str(directory / 'face.png'), 'mask': str(directory / 'mask.png')}


@pytest.mark.parametrize('task', ['text', 'layout', 'semantic', 'sr', 'inpaint'])
def test_conditional_model_trains_and_samples_from_command_line_conditions(task, stage1_workdir, tmp_path):
  workdir = workdir_with_stage1(stage1_workdir, tmp_path / 'run')
  main.run(conditional_config(task), str(workdir))
  training_grids = list((workdir / 'diffusion' / 'samples').glob('*.png'))
  assert len(training_grids) == (task == 'text')

  config = conditional_config(task, 'sample')
  for name, value in write_inputs(task, tmp_path).items():
    config.sample[name] = value
  main.run(config, str(workdir))
  side = 32 if task == 'semantic' else 16
  grids = [p for p in (workdir / 'diffusion' / 'samples').glob('sample_step2_*.png')]
  assert len(grids) == 1
  singles = sorted(grids[0].with_suffix('').glob('*.png'))
  assert len(singles) == 3
  samples = np.stack([np.asarray(Image.open(p)) for p in singles])
  assert samples.shape == (3, side, side, 3)
  grid = np.asarray(Image.open(grids[0]))
  assert grid.shape[1] > 2 * 128  # [condition | sample] pairs, shown at 128 px at least
  if task == 'inpaint':  # the known pixels are kept
    face = np.asarray(Image.open(tmp_path / 'face.png')).astype(int)
    known = np.asarray(Image.open(tmp_path / 'mask.png')) == 0
    assert np.abs(samples[0].astype(int) - face)[known].max() <= 1
  if task in ('sr', 'inpaint'):
    check_eval_conditional_measures_the_first_sample_its_baseline_and_the_mean_of_several(task, workdir)
  if task == 'inpaint':
    check_the_sweep_chooses_steps_and_guidance_on_selection_images_and_reports_them_held_out(workdir)


def check_eval_conditional_measures_the_first_sample_its_baseline_and_the_mean_of_several(task, workdir):
  config = conditional_config(task, 'eval_conditional')
  config.eval.num_images, config.eval.samples_per_condition = 3, 2
  config.sample.batch_size, config.sample.num_steps = 2, 4
  main.run(config, str(workdir))
  results = json.loads(next((workdir / 'diffusion').glob('eval_*.json')).read_text())
  metric, baseline = ('psnr', 'bicubic') if task == 'sr' else ('masked_psnr', 'biharmonic')
  assert results['num_samples'] == 3 and results['samples_per_condition'] == 2
  assert results['conditions_from'].endswith('seed 1000003')  # the synthetic set's held-out seed
  for name in ('ldm', baseline, 'ldm_mean_of_2'):
    assert np.isfinite(results[name][metric]['mean']), name
  # Two draws of an untrained model differ, so their mean is a third set of images.
  assert results['ldm_mean_of_2'][metric]['mean'] != results['ldm'][metric]['mean']


def test_sample_mode_names_a_class_label_out_of_range():
  config = tiny_config.get_config()
  config.mode = 'sample'
  config.data.num_classes = 6
  config.unet.num_classes = 7
  config.diffusion.conditioning_key = 'adm'
  config.sample.class_label = 9
  with pytest.raises(ConfigError, match=r'class_label=9.*\[0, 5\]'):
    sample_inputs.grid_inputs(config, 2)


def test_sample_mode_refuses_a_mask_of_another_size(tmp_path):
  config = conditional_config('inpaint', 'sample')
  inputs = write_inputs('inpaint', tmp_path)
  Image.fromarray(np.zeros((8, 8), np.uint8), 'L').save(tmp_path / 'small_mask.png')
  config.sample.image, config.sample.mask = inputs['image'], str(tmp_path / 'small_mask.png')
  with pytest.raises(DataError, match='8x8 does not match.*16x16'):
    sample_inputs.grid_inputs(config, 2)


def test_eval_conditional_refuses_several_samples_per_text_prompt(tmp_path):
  config = conditional_config('text', 'eval_conditional')
  config.eval.samples_per_condition = 2
  with pytest.raises(ConfigError, match="samples_per_condition is 2.*not 'caption'"):
    main.run(config, str(tmp_path))


def check_the_sweep_chooses_steps_and_guidance_on_selection_images_and_reports_them_held_out(workdir):
  from experiments import restoration_steps  # pylint: disable=g-import-not-at-top
  config = conditional_config('inpaint', 'eval_conditional')
  config.data.source = 'folder'  # two image folders of 4 images: one to choose on, one to report on
  config.data.path, config.data.eval_path = (str(write_folder(workdir / 'images' / split, 2, seed, size=24))
                                             for split, seed in (('train', 0), ('val', 1)))
  config.data.label_column = ''
  config.eval.num_images, config.sample.batch_size = 3, 2
  results = restoration_steps.sweep(config, str(workdir), [2, 4], config.data.path, 2, workdir / 'sweep',
                                    report_steps=[4], scales=[0.0, 0.5])
  assert results == json.loads((workdir / 'sweep' / 'results.json').read_text())
  pairs = {'ddim2_ig0': (2, 0.0), 'ddim2_ig0.5': (2, 0.5), 'ddim4_ig0': (4, 0.0), 'ddim4_ig0.5': (4, 0.5)}
  assert list(results['selection']) == list(pairs)
  for name, (steps, scale) in pairs.items():  # each pair was measured with its own sampler settings
    assert results['selection'][name]['sampler'] == f'ddim{steps}_eta0_known' + ('_ig0.5' if scale else '')
  selection = {name: run['ldm']['masked_psnr']['mean'] for name, run in results['selection'].items()}
  assert [run['num_samples'] for run in results['selection'].values()] == [2] * 4
  for split, path in (('selection', config.data.path), ('eval', config.data.eval_path)):
    assert {run['conditions_from'] for run in results[split].values()} == {
        f'folder {path}, 4 images, no labels'}
  assert results['chosen'] == max(selection, key=selection.get)
  assert (results['chosen_steps'], results['chosen_image_guidance_scale']) == pairs[results['chosen']]
  # Held out: the reported count at the config's scale (0), then the chosen pair, on other images (3 of them).
  assert list(results['eval']) == ['ddim4_ig0'] + ([results['chosen']] if results['chosen'] != 'ddim4_ig0' else [])
  assert all(run['num_samples'] == 3 for run in results['eval'].values())
  # Each measurement's JSON and grid are kept apart; the workdir keeps each count's last measurement.
  name = 'eval_masked_image_ddim4_eta0_known'
  for split in ('selection', 'eval'):
    assert json.loads((workdir / 'sweep' / split / f'{name}.json').read_text()) == results[split]['ddim4_ig0']
    assert Image.open(workdir / 'sweep' / split / f'{name}.png').size[0] > 128
  assert json.loads((workdir / 'diffusion' / f'{name}.json').read_text()) == results['selection']['ddim4_ig0']
