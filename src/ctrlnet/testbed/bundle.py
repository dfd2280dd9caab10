"""Bundle a trained nano ControlNet into ``src/ctrlnet/testbed/controlnets/<name>/``.

    python -m ctrlnet.testbed.bundle --run runs/nano-canny --name nano-canny --config nano-canny \\
        [--set learning_rate=1e-3 ...]

Writes the run's final ControlNet as a diffusers folder in fp16 safetensors (half the bytes; load
with ``dtype=torch.float32`` on CPUs) and ``TRAINING.json``: the exact commands (data, training),
seed, steps and wall time, read from the run itself, and the figures of the given ``ctrlnet eval``
reports.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ..formats import load_controlnet, save_controlnet
from ..formats.checkpoint import latest_checkpoint

from . import CONTROLNETS


def bundle(run: Path, name: str, config: str, overrides: list[str], reports: list[str] = ()) -> Path:
    record = json.loads((run / "controlnet" / "training.json").read_text())
    state = json.loads((latest_checkpoint(run / "checkpoints") / "state.json").read_text())
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    val = [r for r in log if "iou" in r]
    out = CONTROLNETS / name
    save_controlnet(load_controlnet(run / "controlnet"), out, format="diffusers", half=True)
    cfg = record["config"]
    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)
    (out / "TRAINING.json").write_text(json.dumps({
        "commands": ["ctrlnet data shapes --n 50000 --out data/shapes-train --seed 0",
                     "ctrlnet data shapes --n 1000 --out data/shapes-val --seed 1",
                     f"ctrlnet train --config {config}{sets}"],
        "seed": cfg["seed"], "steps": record["steps"], "minutes": round(state["elapsed"] / 60, 1),
        "samples": cfg["max_train_samples"] or "all", "batch": cfg["train_batch_size"],
        "learning_rate": cfg["learning_rate"], "last_validation": val[-1] if val else None,
        "dtype": "float16 (trained in float32)",
        "machine": "2 vCPU (AMD EPYC), torch 2.13.0 CPU, fp32 training",
        "note": ("the run ended at max_train_steps: rerunning the commands on the same machine repeats it"
                 if record["steps"] == cfg["max_train_steps"] else
                 "the run stopped on max_train_minutes (wall time): rerunning repeats the recipe, not these bytes"),
        "eval": [_eval_summary(Path(r)) for r in reports]},
        indent=2) + "\n")
    return out


def _eval_summary(report: Path) -> dict:
    """The numbers of a `ctrlnet eval` report.json, with the command-relevant settings."""
    r = json.loads(report.read_text())
    return {"data": r["data"], "n": r["n"], "controls": r["controls"], "settings": r["settings"],
            "metrics": r["results"][-1]["metrics"], "without_control": r["baseline"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ctrlnet.testbed.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--config", required=True, help="the config the run was started with")
    parser.add_argument("--set", action="append", default=[], help="the --set overrides the run was started with")
    parser.add_argument("--report", action="append", default=[], help="`ctrlnet eval` report.json files to record")
    args = parser.parse_args(argv)
    print(bundle(args.run, args.name, args.config, args.set, args.report))


if __name__ == "__main__":
    main()
