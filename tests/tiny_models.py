"""The smallest digits-shaped U-Net, for tests that train or package a model and only need it to run.
A plain module, imported by the tests that use it (`from tiny_models import TINY_UNET`)."""

from diffusion_core.unet import UNetConfig

TINY_UNET = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                       attention_resolutions=(), num_heads=1, num_classes=10)
