"""What a run leaves behind: metrics (JSONL and CSV), curves and prediction overlays as PNG,
and the progress bar while it runs."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cossim_fast.data import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, colorize

TRAIN_COLUMNS = ("iteration", "loss_ce", "loss_cos", "loss_ent", "selected", "pseudo_kept", "lr", "weight_cos", "it_per_s", "peak_mib")


def live_bars() -> bool:
    """Progress bars only on a terminal: redirected to a file (a cluster job's log), their
    redraws and cursor moves are noise, and the trainer prints a line per log step instead."""
    return sys.stderr.isatty()


def progress(total: int, initial: int, description: str, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, disable=not (enabled and live_bars()), file=sys.stderr,
                dynamic_ncols=True)


def progress_iter(items, description: str, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, desc=description, disable=not (enabled and live_bars()), leave=False, file=sys.stderr,
                dynamic_ncols=True)


def brief(row: dict[str, Any]) -> str:
    parts = [f"ce {row['loss_ce']:.3f}"]
    if "loss_cos" in row:
        parts.append(f"cos {row['loss_cos']:.3f} sel {row['selected']:.2f}")
    if "loss_ent" in row:
        parts.append(f"ent {row['loss_ent']:.3f}")
    if "pseudo_share" in row:
        top = int(np.argmax(row["pseudo_share"]))
        share = row["pseudo_share"][top]
        parts.append(f"top PL {CLASS_NAMES[top]} {share:.0%}" if share > 0 else "no PL kept")
    parts.append(f"{row['peak_mib']:.0f} MiB")
    return ", ".join(parts)


def _json_line(row: dict[str, Any]) -> str:
    """One strict-JSON line: a non-finite number (NaN: the IoU of a class absent from prediction
    and ground truth; a diverged loss) becomes null, as Python's bare NaN and Infinity are not JSON."""

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(item) for item in value]
        return value

    return json.dumps(strict(row), allow_nan=False) + "\n"


def append_metrics(row: dict[str, Any], run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "a") as stream:
        stream.write(_json_line(row))


def rewrite_metrics(history: list[dict[str, Any]], run_dir: Path) -> None:
    """``metrics.jsonl`` as ``history`` holds it (on resume: rows logged after the checkpoint go)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / "metrics.jsonl.tmp"
    temporary.write_text("".join(_json_line(row) for row in history))
    os.replace(temporary, run_dir / "metrics.jsonl")


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(history: list[dict[str, Any]], run_dir: Path) -> None:
    """``metrics.csv``, ``eval.csv``, ``loss.png`` and ``miou.png`` from the run's history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [row for row in history if "loss_ce" in row]
    evals = [{"iteration": row["iteration"], **row["eval"]} for row in history if "eval" in row]
    _write_csv(run_dir / "metrics.csv", TRAIN_COLUMNS, train)
    if evals:
        _write_csv(run_dir / "eval.csv", [k for k in evals[-1] if not k.startswith("IoU.")], evals)

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in ("loss_ce", "loss_cos", "loss_ent"):
        points = [(row["iteration"], row[name]) for row in train if name in row]
        if points:
            axis.plot(*zip(*points), label=name)
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "loss.png", dpi=100)
    plt.close(figure)

    if evals:
        figure, axis = plt.subplots(figsize=(7, 4))
        for key in [k for k in evals[-1] if k.startswith("mIoU")]:
            scores = [100 * row[key] for row in evals]  # stored as fractions
            axis.plot([row["iteration"] for row in evals], scores, marker="o", label=f"target {key}")
        axis.set_xlabel("iteration")
        axis.set_ylabel("mIoU (%)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(run_dir / "miou.png", dpi=100)
        plt.close(figure)


@torch.no_grad()
def write_overlays(model, dataset, device: torch.device, out_dir: Path, count: int = 4) -> None:
    """For the first ``count`` val images: image | prediction | ground truth, one PNG each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for index in range(min(count, len(dataset))):
        image, label, name = dataset[index]
        logits = model(image[None].to(device)).logits.float()
        prediction = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False).argmax(1)[0]
        picture = ((image * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        picture = np.asarray(Image.fromarray(picture).resize((label.shape[1], label.shape[0]), Image.Resampling.BILINEAR))
        panel = np.concatenate([picture, colorize(prediction.cpu().numpy()), colorize(label.numpy())], axis=1)
        Image.fromarray(panel).save(out_dir / f"{index:02d}_{name.replace('/', '_')}.png")
