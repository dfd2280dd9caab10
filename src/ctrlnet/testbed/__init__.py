"""The embedded default: ShapesWorld data (``shapes``), the nano Stable Diffusion (``nano``,
bundled in ``nano-sd/``), ControlNets trained on it (``controlnets/``) and tiny random models for
tests (``tiny``)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
NANO_SD = HERE / "nano-sd"
CONTROLNETS = HERE / "controlnets"


def bundled_controlnets() -> dict[str, Path]:
    """Bundled ControlNets by name (``nano-canny`` -> its diffusers folder)."""
    if not CONTROLNETS.is_dir():
        return {}
    return {p.name: p for p in sorted(CONTROLNETS.iterdir()) if (p / "config.json").is_file()}
