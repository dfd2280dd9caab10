"""The embedded default: ShapesWorld data (``shapes``), the nano Stable Diffusion (``nano``,
bundled in ``nano-sd/``) and tiny random models for tests (``tiny``)."""

from pathlib import Path

NANO_SD = Path(__file__).resolve().parent / "nano-sd"
