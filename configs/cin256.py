"""Class-conditional LDM-8 on ImageNet, the paper's cin256 (models/ldm/cin256): the same model as
configs/cin_f8.py (configs/latent-diffusion/cin-ldm-vq-f8.yaml), under the released model's name."""

from configs.cin_f8 import get_config  # pylint: disable=unused-import
