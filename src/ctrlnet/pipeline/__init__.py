"""Generation: ``Pipeline`` (prompt + control images -> images, ``controlled``), the denoising
loop (``sampling``), text conditioning (``text``), samplers by name (``schedulers``), the valid
range of every numeric argument (``ranges``) and the shortest tensor path for the monitor and
tests (``text_to_image``)."""

from .controlled import Control, Pipeline, Region, Result, SlowDtypeWarning
from .ranges import MAX_SEED, RANDOM_SEED, RANGES
from .sampling import rescale_noise_cfg
from .text import PromptTruncatedWarning, encode_text
from .text_to_image import text_to_image

__all__ = ["Control", "Pipeline", "Region", "Result", "SlowDtypeWarning", "PromptTruncatedWarning", "encode_text",
           "rescale_noise_cfg", "text_to_image", "RANGES", "MAX_SEED", "RANDOM_SEED"]
