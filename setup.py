"""latent_diffusion: Latent Diffusion Models (Rombach et al., CVPR 2022) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name='latent_diffusion',
    version='0.1.0',
    description='Latent Diffusion Models in JAX/Flax: both stages, one CPU to a TPU/GPU mesh.',
    packages=find_packages(include=['latent_diffusion', 'latent_diffusion.*', 'configs', 'configs.*']),
    python_requires='>=3.11',
    install_requires=[line.strip() for line in open('requirements.txt')
                      if line.strip() and not line.startswith('#')],
)
