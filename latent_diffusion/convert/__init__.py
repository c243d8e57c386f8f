"""Weights from elsewhere: the paper's Lightning checkpoints and diffusers, for each network.

`autoencoder`: AutoencoderKL / VQModel. `unet_paper` and `unet_diffusers`: the diffusion U-Net.
"""
