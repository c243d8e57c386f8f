"""Semantic synthesis LDM-4 at 512 px (models/ldm/semantic_synthesis512, landscapes): the 256 model's
network on 512x512 crops (128x128 latents)."""

from configs.semantic_synthesis256 import semantic_config


def get_config():
  return semantic_config(image_size=512, batch_size=8)
