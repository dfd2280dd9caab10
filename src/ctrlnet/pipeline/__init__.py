"""Generation: prompt encoding and the denoising loop."""

from .text_to_image import encode_prompts, rescale_noise_cfg, text_to_image

__all__ = ["encode_prompts", "rescale_noise_cfg", "text_to_image"]
