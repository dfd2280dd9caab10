"""Watching convergence: the log (JSONL, TensorBoard when installed), validation grids, the
controllability score on a fixed held-out set, and a PNG plot of loss and controllability
against steps - where the seed's "sudden convergence" shows as a jump.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from ..eval.control import controllability
from ..pipeline.text_to_image import text_to_image
from .data import ControlDataset, condition_to_tensor, read_records


class Monitor:
    def __init__(self, trainer, config):
        self.trainer = trainer
        self.config = config
        self.out = Path(config.output_dir)
        self.log_path = self.out / "log.jsonl"
        self.writer = None
        self.enabled = bool(config.validation_data)
        self.val = None
        if self.enabled:
            records = read_records(config.validation_data, config.image_column, config.conditioning_image_column,
                                   config.caption_column, need_condition=not config.annotator)
            records = records[:config.num_validation_samples]
            self.val = ControlDataset(records, config.resolution, True, trainer.dataset.annotator)

    def start(self, step: int) -> None:
        """Open the log; on resume, drop records of steps after the checkpoint (they will be redone)."""
        if self.log_path.is_file():
            kept = [l for l in self.log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            tmp = self.log_path.with_name("log.jsonl.tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            tmp.replace(self.log_path)
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1 if step else None)
            except ImportError:
                self.writer = None

    def log(self, **record) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}" if k in ("loss", "lr", "img_per_s") else f"val/{k}", v,
                                           record["step"])

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Generate the held-out conditions' images, score them, write the grid and the curves."""
        c, tr = self.config, self.trainer
        net = tr.output_net()
        was_training = net.training
        net.eval()
        n = len(self.val)
        targets = [self.val.image(i) for i in range(n)]
        conditions = [self.val.condition(i, image=targets[i]) for i in range(n)]
        prompts = [self.val.text(i) for i in range(n)]
        images = []
        for s in range(0, n, 8):  # batches of 8 keep memory flat at large resolutions
            cond = condition_to_tensor(conditions[s:s + 8]).to(tr.acc.device)
            images.append(text_to_image(tr.base, prompts[s:s + 8], steps=c.validation_inference_steps,
                                        guidance=c.validation_guidance, guidance_rescale=c.validation_guidance_rescale,
                                        seed=1000 + s, height=c.resolution, width=c.resolution, controlnets=[net],
                                        conditions=[cond]))
        net.train(was_training)
        images = np.concatenate(images)
        scores = [controllability(g, t) for g, t in zip(images, targets)]
        result = {"step": step, "iou": round(float(np.mean([s["iou"] for s in scores])), 4),
                  "edge_f1": round(float(np.mean([s["edge_f1"] for s in scores])), 4), "n_val": n}
        self.log(**result)
        grid_dir = self.out / "validation"
        grid_dir.mkdir(parents=True, exist_ok=True)
        rows = [np.concatenate([conditions[i], images[i], targets[i]], axis=1) for i in range(min(n, 8))]
        Image.fromarray(np.concatenate(rows, axis=0)).save(grid_dir / f"step-{step:06d}.png")
        self.plot()
        print(f"validation at step {step}: iou {result['iou']:.3f}, edge F1 {result['edge_f1']:.3f} "
              f"(grid: condition | generated | target in {grid_dir})", flush=True)
        return result

    def plot(self) -> Path | None:
        """loss (smoothed) and controllability against steps, as curves.png."""
        return plot_curves(self.log_path, self.out / "curves.png")

    def finish(self) -> None:
        self.plot()
        if self.writer is not None:
            self.writer.close()


def plot_curves(log_path: Path, png: Path) -> Path | None:
    if not log_path.is_file():
        return None
    records = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "iou" in r]
    fig = Figure(figsize=(10, 3.6))  # no pyplot: no global backend state
    ax = fig.subplots(1, 2)
    if train:
        steps, loss = np.array([r["step"] for r in train]), np.array([r["loss"] for r in train])
        ax[0].plot(steps, loss, alpha=0.3, color="C0")
        k = max(1, len(loss) // 20)
        if len(loss) >= k:
            ax[0].plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color="C0")
    ax[0].set(xlabel="step", ylabel="loss", title="training loss")
    if val:
        ax[1].plot([r["step"] for r in val], [r["iou"] for r in val], "o-", label="mask IoU")
        ax[1].plot([r["step"] for r in val], [r["edge_f1"] for r in val], "s-", label="edge F1")
        ax[1].legend()
    ax[1].set(xlabel="step", ylabel="score", ylim=(0, 1), title="controllability (held-out)")
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    tmp.replace(png)
    return png
