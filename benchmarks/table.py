"""The markdown table of a benchmark result JSON (benchmarks/README.md is made of these)."""


def _ms(row: dict | None) -> str:
  if not row:
    return '-'
  return f'{1e3 * row["median_s"]:.1f} ({1e3 * row["min_s"]:.1f}-{1e3 * row["max_s"]:.1f})'


def _pairs(results: dict):
  for name in ('unet_forward', 'unet_train', 'ddim_sample', 'kl_codec'):
    for case, row in results['benchmarks'].get(name, {}).items():
      ratio = f'{row["ratio"]:.2f}' if 'ratio' in row else '-'
      yield f'| {name} | {case} | {_ms(row["ours"])} | {_ms(row.get("reference"))} | {ratio} |'


def markdown(results: dict) -> str:
  machine = results['machine']
  lines = [f'{results["date"]}, {machine["backend"]}: {", ".join(sorted(set(machine["devices"])))}; CPU '
           f'{machine["cpu"]} ({machine["cpu_count"]} cores); jax {machine["jax"]}'
           + (f', torch {machine["torch"]} ({machine.get("torch_threads")} threads)' if 'torch' in machine else '')
           + (f', diffusers {machine["diffusers"]}' if 'diffusers' in machine else '')
           + f'; {results["repeats"]} repeats' + (' (quick)' if results.get('quick') else '')]
  pairs = list(_pairs(results))
  if pairs:
    lines += ['', '| benchmark | case | ours ms, median (min-max) | diffusers/PyTorch ms | ours / reference |',
              '| --- | --- | --- | --- | --- |'] + pairs
  benchmarks = results['benchmarks']
  if 'compile' in benchmarks:
    lines += ['', '| compile | cold: lower + compile s | from the persistent cache s |', '| --- | --- | --- |']
    for case, row in benchmarks['compile'].items():
      lines.append(f'| {case} (b{row["batch"]}) | {row["cold"]["lower_s"]:.1f} + {row["cold"]["compile_s"]:.1f} '
                   f'| {row["cached"]["lower_s"]:.1f} + {row["cached"]["compile_s"]:.1f} |')
  for case, row in benchmarks.get('latent_vs_pixel', {}).items():
    lines += ['', f'Latent vs pixel ({case}, {row["num_steps"]} DDIM steps, {row["config"]}): U-Net forward '
              f'{_ms(row["latent_forward"])} ms on latents, {_ms(row["pixel_forward"])} ms on pixels '
              f'(attention at ds {row["pixel_attention_resolutions"]}), decode {_ms(row["decode"])} ms: '
              f'{row["latent_samples_per_s"]:.3g} vs {row["pixel_samples_per_s"]:.3g} samples/s, '
              f'{row["speedup"]:.1f}x.']
  if 'sampler_throughput' in benchmarks:
    lines += ['', '| sampler_throughput | compile s | samples/s (latents) | samples/s with decode | U-Net TFLOP/s |',
              '| --- | --- | --- | --- | --- |']
    for case, row in benchmarks['sampler_throughput'].items():
      lines.append(f'| {case} | {row["compile_s"]:.1f} | {row["samples_per_s"]:.1f} | '
                   f'{row["samples_per_s_with_decode"]:.1f} | {row["unet_tflops_per_s"]:.1f} |')
  if 'train_mfu' in benchmarks:
    lines += ['', '| train_mfu | compile s | step ms | counted TFLOP/step | TFLOP/s | MFU | images/s |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for case, row in benchmarks['train_mfu'].items():
      mfu = f'{100 * row["mfu"]:.1f}% of {row["peak_tflops"]:g}' if row['mfu'] else '-'
      lines.append(f'| {case} | {row["compile_s"]:.1f} | {_ms(row["step"])} | {row["counted_tflop_per_step"]:.2f} | '
                   f'{row["achieved_tflops_per_s"]:.1f} | {mfu} | {row["images_per_s"]:.0f} |')
  for case, row in benchmarks.get('input_pipeline', {}).items():
    lines += ['', f'Input pipeline ({case}, {row["worker_count"]} workers): {row["images_per_s"]:.0f} images/s.']
  return '\n'.join(lines)
