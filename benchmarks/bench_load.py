"""Base model load time and peak memory, SD1.5-sized (random weights from the shipped configs):
a single-file checkpoint (CompVis keys, as A1111 / ComfyUI users have it) against the same
weights as a diffusers folder.

    .venv/bin/python benchmarks/bench_load.py --make /tmp/sd15-bench       # once: write the files
    .venv/bin/python benchmarks/bench_load.py --measure /tmp/sd15-bench [--repeat 2] [--compare SRC] [--tokenizer DIR]

``--make`` writes ``sd15-fp16.safetensors`` (the usual download), ``sd15-fp32.safetensors`` and
``folder/`` (diffusers layout, fp32) from one random SD1.5 (seed 0). ``--measure`` loads each in a
fresh Python process with ``ctrlnet.load_base(path)`` (fp32 result, as the CLI's default) and
prints the wall time of the call and the process's peak RSS (``ru_maxrss``; the RSS after the
imports is reported apart), then "ready": the same once every weight has been read (summed once:
safetensors maps files, so a load alone may not have read the weights yet). Layouts are interleaved round by round with ``--repeat``; the median is given.
Every file is read once first, so that all layouts load from the page cache (the disk is not
what is compared; 24 GiB of RAM hold the three). ``--compare SRC`` measures another version of ctrlnet (its ``src``, e.g. a ``git worktree`` of an
earlier commit) alternately with this one; versions before the shipped tokenizer need
``--tokenizer src/ctrlnet/configs/clip-bpe``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
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

    from ctrlnet.base import SHIPPED_BPE, LockedBase, shipped_tokenizer
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
    for name in ("vocab.json", "merges.txt"):  # the classic layout too, for versions that need it
        shutil.copy(SHIPPED_BPE / name, folder / "tokenizer" / name)
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
    # safetensors maps the file: weights are read from disk when first used. Touch every weight
    # once, so that "ready" includes reading them all.
    import torch
    t2 = time.perf_counter()
    with torch.no_grad():
        total = sum(float(p.double().sum()) for part in base.parts().values() for p in part.parameters())
    touched = time.perf_counter() - t2
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert total == total  # finite weights were read
    print(json.dumps({"load_s": seconds, "import_s": imported, "peak_rss_gib": rss, "rss_after_imports_gib": rss_imports,
                      "ready_s": seconds + touched, "peak_rss_ready_gib": rss_ready}))


def measure(folder: Path, repeat: int, tokenizer: str | None, compare: str | None) -> None:
    """Every layout in a fresh process, round by round; with ``compare`` (another version's ``src``)
    the two versions alternate within each round."""
    import os
    versions = [("this", None)] + ([("compare", compare)] if compare else [])
    for f in sorted(folder.rglob("*")):  # page cache warm for every layout alike: loads, not the disk, are timed
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    rows: dict[tuple[str, str], list[dict]] = {(v, k): [] for v, _ in versions for k in LAYOUTS}
    for _ in range(repeat):
        for layout in LAYOUTS:
            for label, src in versions:
                env = dict(os.environ, PYTHONPATH=src) if src else None
                extra = ["--tokenizer", tokenizer] if tokenizer else []
                out = subprocess.run([sys.executable, __file__, "--child", str(folder / layout)] + extra, check=True,
                                     capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
                rows[label, layout].append(json.loads(out))
    print(f"this version: {ROOT / 'src'}" + (f"; compare: {compare}" if compare else ""))
    print(f"{'version':8} {'layout':24} {'load s':>8} {'peak RSS GiB':>13} {'ready s':>8} {'peak RSS ready':>15} "
          f"{'RSS after imports':>18}")
    for (label, layout), rs in rows.items():
        med = lambda k: statistics.median(r[k] for r in rs)
        print(f"{label:8} {layout:24} {med('load_s'):8.1f} {med('peak_rss_gib'):13.2f} {med('ready_s'):8.1f} "
              f"{med('peak_rss_ready_gib'):15.2f} {med('rss_after_imports_gib'):18.2f}   (runs: {', '.join('%.1f' % r['load_s'] for r in rs)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--make", type=Path)
    g.add_argument("--measure", type=Path)
    g.add_argument("--child")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--compare", help="another version's src folder, measured alternately with this one")
    p.add_argument("--tokenizer", help="pass tokenizer=DIR to single files (versions before the shipped tokenizer)")
    a = p.parse_args()
    if a.make:
        make(a.make)
    elif a.measure:
        measure(a.measure, a.repeat, a.tokenizer, a.compare)
    else:
        child(a.child, a.tokenizer)


if __name__ == "__main__":
    main()
