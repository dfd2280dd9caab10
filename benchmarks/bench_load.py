"""Base model load time and peak memory, SD1.5-sized (random weights from the shipped configs):
a single-file checkpoint (CompVis keys, as A1111 / ComfyUI users have it) against the same
weights as a diffusers folder.

    .venv/bin/python benchmarks/bench_load.py --make /tmp/sd15-bench       # once: write the files
    .venv/bin/python benchmarks/bench_load.py --measure /tmp/sd15-bench [--repeat 2] [--tokenizer DIR]

``--make`` writes ``sd15-fp16.safetensors`` (the usual download), ``sd15-fp32.safetensors`` and
``folder/`` (diffusers layout, fp32) from one random SD1.5 (seed 0). ``--measure`` loads each in a
fresh Python process with ``ctrlnet.load_base(path)`` (fp32 result, as the CLI's default) and
prints the wall time of the call and the process's peak RSS (``ru_maxrss``, after the imports, which
are reported apart). Layouts are interleaved round by round with ``--repeat``; the median is given.
To compare with another version of ctrlnet, run ``--measure`` with ``PYTHONPATH`` pointing at its
``src`` (e.g. a ``git worktree`` of an earlier commit).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("sd15-fp16.safetensors", "sd15-fp32.safetensors", "folder")


def make(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from ctrlnet.base import LockedBase, shipped_tokenizer
    from ctrlnet.configs import CONFIGS_DIR
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import sd15_single_file  # diffusers -> CompVis key names, as the tests use it

    cfg = CONFIGS_DIR / "sd15"
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((cfg / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((cfg / "vae" / "config.json").read_text()))
    te = CLIPTextModel(CLIPTextConfig.from_dict(json.loads((cfg / "text_encoder" / "config.json").read_text())))
    sched = DDIMScheduler.from_pretrained(cfg / "scheduler")
    base = LockedBase(unet, vae, te, shipped_tokenizer(), sched, "sd15", "random")
    sd = sd15_single_file(base)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, out / "sd15-fp32.safetensors")
    save_file({k: v.half().contiguous() for k, v in sd.items()}, out / "sd15-fp16.safetensors")
    folder = out / "folder"
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        part.save_pretrained(folder / name, safe_serialization=True)
    shipped_tokenizer().save_pretrained(folder / "tokenizer")
    sched.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    print(f"wrote {out}")


def child(path: str, tokenizer: str | None) -> None:
    """One load in this (fresh) process; prints a JSON line."""
    t0 = time.perf_counter()
    import ctrlnet.base as cb
    imported = time.perf_counter() - t0
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)
    t1 = time.perf_counter()
    base = cb.load_base(path, tokenizer=tokenizer if path.endswith(".safetensors") else None)
    seconds = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert base.unet.dtype.is_floating_point
    print(json.dumps({"load_s": seconds, "import_s": imported, "peak_rss_gib": rss, "rss_after_imports_gib": rss_imports}))


def measure(folder: Path, repeat: int, tokenizer: str | None) -> None:
    rows: dict[str, list[dict]] = {k: [] for k in LAYOUTS}
    for _ in range(repeat):
        for layout in LAYOUTS:
            extra = ["--tokenizer", tokenizer] if tokenizer else []
            out = subprocess.run([sys.executable, __file__, "--child", str(folder / layout)] + extra, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows[layout].append(json.loads(out))
    import ctrlnet
    print(f"ctrlnet {ctrlnet.__version__} from {Path(ctrlnet.__file__).parent}")
    print(f"{'layout':24} {'load s':>8} {'peak RSS GiB':>13} {'RSS after imports':>18}")
    for layout, rs in rows.items():
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"{layout:24} {med('load_s'):8.1f} {med('peak_rss_gib'):13.2f} {med('rss_after_imports_gib'):18.2f}"
              f"   (runs: {', '.join('%.1f' % r['load_s'] for r in rs)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--make", type=Path)
    g.add_argument("--measure", type=Path)
    g.add_argument("--child")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--tokenizer", help="pass tokenizer=DIR to single files (versions before the shipped tokenizer)")
    a = p.parse_args()
    if a.make:
        make(a.make)
    elif a.measure:
        measure(a.measure, a.repeat, a.tokenizer)
    else:
        child(a.child, a.tokenizer)


if __name__ == "__main__":
    main()
