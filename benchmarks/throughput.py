"""Accelerator throughput: samples/s of a whole DDIM run, and the training step's model FLOPs
utilisation (MFU) from XLA's own count of the compiled step's FLOPs.

MFU = counted FLOPs per step / step time / the chip's dense bf16 peak (datasheet; `--peak_tflops`
overrides). The count is XLA's cost analysis of the compiled step (forward, backward, optimizer).
"""

import time

import jax
import jax.numpy as jnp

from benchmarks import timing, unet
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import diffusion

# Dense bf16 TFLOP/s by device kind (vendor datasheets, SXM parts).
PEAK_BF16_TFLOPS = {'h100': 989.0, 'h200': 989.0, 'a100': 312.0, 'tpu v4': 275.0, 'tpu v5e': 197.0,
                    'tpu v5p': 459.0}


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in kind), None)


def with_settings(config, dtype: str, attention_impl: str):
  config = config.copy_and_resolve_references()
  config.dtype, config.unet.attention_impl = dtype, attention_impl
  config.sample.sampler, config.sample.eta = 'ddim', 0.0
  return config


def counted_flops(fn, *args) -> float:
  """XLA's FLOP count of fn(*args), lowered for the CPU: GPU lowerings hand convolutions to cuDNN
  custom calls, which XLA's cost analysis does not count. The program's arithmetic is the same."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
  analysis = jax.jit(fn).lower(*abstract).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis['flops'])


def sampler(config, batch: int, num_steps: int, repeats: int, dtype: str = 'bfloat16',
            attention_impl: str = 'auto') -> dict:
  """DDIM `num_steps` from noise to latents, then the decode, for `batch` samples."""
  config = with_settings(config, dtype, attention_impl)
  model = diffusion.build_denoiser(config)
  autoencoder = stage1.build_autoencoder(config)
  schedule = diffusion.schedule_from_config(config)
  params = timing.random_params(lambda: diffusion.init_params(model, config, jax.random.PRNGKey(0)))
  size = config.data.image_size
  ae_params = timing.random_params(
      lambda: autoencoder.init(jax.random.PRNGKey(1), jnp.zeros((1, size, size, 3)))['params'])
  sample = diffusion.make_sampler(model, autoencoder, config, schedule)
  latents_only = jax.jit(lambda params, rng: diffusion.sample_latents(model, config, schedule, params, rng, {},
                                                                      batch, num_steps))
  start = time.perf_counter()
  compiled = latents_only.lower(params, jax.random.PRNGKey(2)).compile()
  compile_s = time.perf_counter() - start
  latents = timing.measure(lambda: jax.block_until_ready(compiled(params, jax.random.PRNGKey(2))), repeats)
  decoded = timing.measure(lambda: jax.block_until_ready(
      sample(params, ae_params, jnp.float32(1.0), jax.random.PRNGKey(3), {}, num_samples=batch,
             num_steps=num_steps)), repeats)
  forward_flops = counted_flops(model.apply, {'params': diffusion.model_params(params)},
                                jnp.zeros((batch,) + diffusion.latent_shape(config)), jnp.zeros((batch,), jnp.int32))
  seconds = latents['median_s']
  return {'batch': batch, 'num_steps': num_steps, 'dtype': dtype, 'attention_impl': attention_impl,
          'compile_s': compile_s, 'latents': latents, 'with_decode': decoded,
          'samples_per_s': batch / seconds, 'samples_per_s_with_decode': batch / decoded['median_s'],
          'unet_tflops_per_s': forward_flops * num_steps / seconds / 1e12}


def train_step(config, batch: int, repeats: int, dtype: str = 'bfloat16', attention_impl: str = 'auto',
               peak: float | None = None) -> dict:
  """The stage-2 train_step (unet.train_step_program) with its counted FLOPs and MFU."""
  config = with_settings(config, dtype, attention_impl)
  step_fn, state, batch_arrays = unet.train_step_program(config, batch)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - start
  flops = counted_flops(step_fn, state, batch_arrays)
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch_arrays)
    jax.block_until_ready(metrics['loss'])
  timed = timing.measure(step, repeats, warmup=2)
  peak = peak or peak_tflops(jax.devices()[0].device_kind)
  achieved = flops / timed['median_s'] / 1e12
  return {'batch': batch, 'dtype': dtype, 'attention_impl': attention_impl, 'compile_s': compile_s,
          'step': timed, 'counted_tflop_per_step': flops / 1e12, 'achieved_tflops_per_s': achieved,
          'peak_tflops': peak, 'mfu': achieved / peak if peak else None,
          'images_per_s': batch / timed['median_s']}
