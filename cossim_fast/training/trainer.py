"""The UDA training loop of METHOD.md 6: source cross-entropy, dictionary update, target
pseudo-labels and the cosine-similarity loss, on one process or many (torchrun + DDP)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import cossim_fast
from cossim_fast.data import DATASETS, IGNORE_INDEX, NUM_CLASSES, DatasetError
from cossim_fast.evaluation import ConfusionMatrix
from cossim_fast.models import build_model
from cossim_fast.training import checkpoint, distributed, memory, reporting
from cossim_fast.training.config import (
    Config,
    ConfigError,
    DomainConfig,
    check_resumable,
    config_changes,
    save_config,
    to_dict,
)
from cossim_fast.training.source_loss import upsampled_cross_entropy
from cossim_fast.training.streams import CachedDataset, batch_stream
from cossim_fast.training.target_losses import class_shares, downsample_labels, entropy_loss, pseudo_labels

CHECKPOINT_DIR = "checkpoints"


def make_dataset(domain: DomainConfig, key: str, *, labels: bool, full_resolution_labels: bool = False,
                 warn: bool = True, deep_scan: bool = False):
    """A dataset of the configured layout, checked before training starts (pre-flight, decoding
    every file with ``deep_scan``); its errors name the config ``key`` (e.g. ``data.source``)
    whose root or kind to change. ``warn=False`` keeps its warnings quiet (DDP ranks other than
    the first)."""
    kind = DATASETS[domain.kind]
    options: dict[str, Any] = dict(load_labels=labels, resize=tuple(domain.size), resize_label=not full_resolution_labels)
    if domain.kind == "cityscapes":
        options["split"] = domain.split
    elif domain.split != "train" and warn:  # e.g. a val set switched to gta5, keeping split: val
        print(f"warning: {key}.split={domain.split!r} is ignored: {domain.kind} has no splits, every image under "
              f"{key}.root is read")
    try:
        dataset = kind(domain.root, **options)
        report = dataset.preflight(deep=deep_scan)
    except DatasetError as error:
        raise DatasetError(f"{key} ({key}.kind={domain.kind}, {key}.root={domain.root}): {error}") from error
    for warning in report.warnings if warn else ():
        print(f"warning: {key}: {warning}")
    return dataset


def check_paths(config: Config, resume_from: Path | None) -> None:
    """The files and folders a run reads or writes, checked before any data is generated or
    scanned (a typo in a path then costs seconds, not a scan of the data set)."""
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        raise ConfigError(f"output_dir: {config.output_dir} exists and is not a folder")
    synthetic = config.data.synthetic
    if synthetic.enabled and Path(synthetic.root).exists() and not Path(synthetic.root).is_dir():
        raise ConfigError(f"data.synthetic.root: {synthetic.root} exists and is not a folder")
    for key, value in (("model.pretrained", config.model.pretrained), ("model.init_from", config.model.init_from)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{key}: {value} is not a file")
    if resume_from is not None and not resume_from.is_file():
        raise FileNotFoundError(f"checkpoint {resume_from} does not exist")


class TrainingDivergedError(RuntimeError):
    """A logged loss is not finite: the weights are no longer usable."""


def check_finite(row: dict[str, Any], config: Config) -> None:
    """Stop a run whose logged losses are NaN or infinite (a NaN gradient has reached the
    weights, or will); fp16 loss scaling skips such steps by itself, so there it is a warning."""
    bad = [name for name in ("loss_ce", "loss_cos", "loss_ent") if name in row and not math.isfinite(row[name])]
    if not bad:
        return
    what = f"{', '.join(f'{name} = {row[name]}' for name in bad)} in the steps logged at iteration {row['iteration']}"
    if config.train.amp == "fp16":
        print(f"warning: {what} (fp16 loss scaling skips those steps)")
        return
    raise TrainingDivergedError(
        f"{what}: training diverged. Check the labels (data.*.root, raw ids) and the learning rate (optim.lr); "
        "the last checkpoint holds the weights from before"
    )


def loss_weight(config: Config, iteration: int) -> float:
    """``lambda_cos``: off during the warm-up, then ramped linearly to its full value."""
    cosine = config.cosine
    if not cosine.enabled or iteration < cosine.warmup_iters:
        return 0.0
    if cosine.ramp_iters <= 0:
        return cosine.weight
    return cosine.weight * min(1.0, (iteration - cosine.warmup_iters + 1) / cosine.ramp_iters)


def poly_factor(config: Config, iteration: int) -> float:
    return (1.0 - iteration / config.train.iterations) ** config.optim.poly_power


def _global_batches(train: dict[str, Any], world: int) -> tuple[int, int]:
    return train["batch_size_source"] * world, train["batch_size_target"] * world


def _found(path: Path) -> str:
    return "found" if path.is_file() else "missing"


@dataclass
class StepStats:
    """Per-iteration quantities summed on the device and read only at log time."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self, context: distributed.Context | None = None) -> dict[str, Any]:
        """Means since the last call, over every rank's passes (the same names on every rank:
        they depend on the config and the iteration only)."""
        result = {
            name: (distributed.mean_over_ranks(self.sums[name], context) / self.counts[name]).tolist()
            for name in sorted(self.sums)
        }
        self.sums, self.counts = {}, {}
        return result

    def state_dict(self, context: distributed.Context | None = None) -> dict[str, Any]:
        """The sums not yet logged, of every rank (call it on every rank): a resumed run with
        as many ranks restores each rank's own, so the next row rounds as an uninterrupted run's."""
        sums = {name: distributed.stack_over_ranks(self.sums[name], context).cpu() for name in sorted(self.sums)}
        return {"sums_per_rank": sums, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device, rank: int = 0, world: int = 1) -> None:
        """Each rank's own sums; with another number of ranks (or a checkpoint that kept only
        their mean), the mean of them, whose mean over the ranks is the same up to rounding."""
        if "sums_per_rank" in state:
            per_rank = state["sums_per_rank"]
            sums = {name: v[rank] if v.shape[0] == world else v.mean(dim=0) for name, v in per_rank.items()}
        else:
            sums = state["sums"]
        self.sums = {name: value.to(device) for name, value in sums.items()}
        self.counts = dict(state["counts"])


class Trainer:
    """Builds everything from a :class:`Config` and runs (or resumes) the training."""

    def __init__(self, config: Config, *, resume: str | None = "auto", progress: bool = True) -> None:
        self.config = config
        self.context = distributed.setup(config.train.device)
        self.device = self.context.device
        self.progress = progress and self.context.is_main
        self.run_dir = Path(config.output_dir)
        if config.train.threads and self.device.type == "cpu":
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.seed)

        resume_from = self._resume_path(resume)
        distributed.check_same_on_all_ranks(
            "checkpoint to resume from", "none" if resume_from is None else f"{resume_from} ({_found(resume_from)})", self.context
        )
        check_paths(config, resume_from)
        if config.data.synthetic.enabled:
            self._generate_synthetic_data()
        scan = dict(warn=self.context.is_main, deep_scan=config.data.deep_scan)
        self.source = make_dataset(config.data.source, "data.source", labels=True, **scan)
        self.target = make_dataset(config.data.target, "data.target", labels=False, **scan)
        self.val = make_dataset(config.data.val, "data.val", labels=True, full_resolution_labels=True, **scan)
        if config.data.num_workers == 0:
            self.source, self.target = CachedDataset(self.source), CachedDataset(self.target)

        model = build_model(
            config.model.name, NUM_CLASSES, pretrained=config.model.pretrained,
            feature_point=config.model.feature_point, freeze_bn=config.model.freeze_bn,
            activation_checkpointing=config.model.activation_checkpointing,
            random_init_notice=config.model.init_from is None and resume_from is None,  # else weights come later
        ).to(self.device)
        if config.model.init_from:
            state = checkpoint.load(config.model.init_from)
            checkpoint.check_model_name(state, config.model.name, config.model.init_from, "model.init_from")
            model.load_state_dict(state["model"])
        self.model = model
        self.net = distributed.wrap(model, self.context)
        self.optimizer = self._make_optimizer(model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.train.amp == "fp16")
        self.dictionary = cossim_fast.FeatureDictionary(
            NUM_CLASSES, config.cosine.slots_per_class, model.feature_channels, device=self.device
        )
        self.criterion = cossim_fast.CosineSimilarityLoss(
            config.cosine.threshold, mode=config.cosine.mode, reduction=config.cosine.reduction,
            backend=config.cosine.backend, dictionary=self.dictionary,
            sync_distributed=True,  # under DDP: the global batch's loss (cossim_fast/ops/distributed.py)
        )
        self.iteration = 0
        self.best_miou = -1.0
        self.history: list[dict[str, Any]] = []
        self.stats = StepStats()  # summed since the last logged row
        self._resume(resume_from)
        if self.context.is_main and self.iteration < config.train.iterations:  # a finished run keeps the config it ran with
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir / "config.yaml")

    # --- setup ----------------------------------------------------------------------------

    def _generate_synthetic_data(self) -> None:
        if self.context.is_main:
            self.config.data.synthetic.generate()
        distributed.barrier(self.context)

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        optim = self.config.optim
        groups = model.parameter_groups(optim.lr, head_lr_mult=optim.head_lr_mult)
        if optim.name == "sgd":
            return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
        return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)

    def _resume_path(self, resume: str | None) -> Path | None:
        """The checkpoint to resume from: ``resume`` itself, or with "auto" the run's last one if any."""
        if resume != "auto":
            return None if resume is None else Path(resume)
        path = self.run_dir / CHECKPOINT_DIR / "last.pt"
        return path if path.is_file() else None

    def _resume(self, path: Path | None) -> None:
        if path is None:
            self._start_fresh()
            return
        # On the CPU: torch wants CPU RNG states; load_state_dict copies the rest to the device.
        state = checkpoint.load(path)
        saved_config = json.loads(state["config"])
        check_resumable(saved_config, to_dict(self.config), path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._apply_optimizer_settings()
        if state["scaler"]:  # empty when saved without fp16 loss scaling: a new scaler starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.dictionary.load_state_dict(state["dictionary"])
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        self.history = [json.loads(line) for line in state["history"]]
        if "pending_stats" in state:  # absent from checkpoints of older versions: the next row averages fewer steps
            self.stats.load_state_dict(state["pending_stats"], self.device, self.context.rank, self.context.world)
        checkpoint.set_rng_state(state["rng"])
        if self.context.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")
            changed = config_changes(saved_config, to_dict(self.config))
            if changed:
                print(f"warning: the config differs from the one {path} was trained with: {'; '.join(changed)}")
            saved_batches = _global_batches(saved_config["train"], state.get("world", 1))
            batches = _global_batches(to_dict(self.config)["train"], self.context.world)
            if saved_batches != batches:  # a stream's samples are a function of its global batch
                print(f"warning: {path} was trained with global batches (source, target) of {saved_batches}, this run "
                      f"has {batches} (batch sizes are per process): the order of the samples changes")
            reporting.rewrite_metrics(self.history, self.run_dir)  # drop rows logged after this checkpoint

    def _start_fresh(self) -> None:
        """A new run: the folder's metrics are the old run's (or a run that crashed before its
        first checkpoint), so they go; its checkpoints are replaced as this run saves its own."""
        if not self.context.is_main:
            return
        if (self.run_dir / "metrics.jsonl").exists():
            reporting.rewrite_metrics([], self.run_dir)
        if any((self.run_dir / CHECKPOINT_DIR).glob("*.pt")):
            print(f"starting a new run in {self.run_dir}: the checkpoints there are replaced as this run saves")

    def _apply_optimizer_settings(self) -> None:
        """The configured hyperparameters over those a checkpoint's optimizer state brought back:
        a fresh optimizer's groups hold them (``lr`` is set every iteration from the schedule)."""
        fresh = self._make_optimizer(self.model).param_groups
        for group, new in zip(self.optimizer.param_groups, fresh, strict=True):
            group.update((key, value) for key, value in new.items() if key != "params")

    def save_checkpoint(self, name: str) -> None:
        """Call it on every rank: the unlogged step statistics of every rank are gathered."""
        pending_stats = self.stats.state_dict(self.context)
        if not self.context.is_main:
            return
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dictionary": self.dictionary.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "history": [json.dumps(row) for row in self.history],
            "pending_stats": pending_stats,
            "rng": checkpoint.rng_state(),
            "config": json.dumps(to_dict(self.config)),
            "world": self.context.world,
        }
        checkpoint.save_atomic(payload, self.run_dir / CHECKPOINT_DIR / f"{name}.pt")

    # --- one iteration --------------------------------------------------------------------

    def _autocast(self):
        amp = self.config.train.amp
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)

    def _gradient_sync(self, sync: bool):
        """DDP all-reduces gradients in the backward of a forward run outside ``no_sync`` (it
        decides at the forward): only the iteration's last pass, forward and backward, does."""
        return contextlib.nullcontext() if sync or self.net is self.model else self.net.no_sync()

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.config.train.grad_accum).backward()

    def _micro_step(self, source, target, iteration: int, micro: int) -> dict[str, torch.Tensor]:
        config = self.config
        last = micro == config.train.grad_accum - 1
        images, labels = (t.to(self.device, non_blocking=True) for t in source)
        weight = loss_weight(config, iteration)
        needs_target = weight > 0 or config.entropy.weight > 0
        with self._gradient_sync(last and not needs_target):
            with self._autocast():
                out = self.net(images)
                ce = upsampled_cross_entropy(
                    out.logits, labels, ignore_index=IGNORE_INDEX, bands=config.train.ce_bands, world=self.context.world
                )
            self._backward(ce)
        stats = {"loss_ce": ce}
        check = iteration % config.train.check_values_every == 0
        if config.cosine.enabled:  # during the loss's warm-up too: the bank is full when it starts
            # One draw per pass (with grad_accum > 1, each pass's rows get their own order).
            step = iteration * config.train.grad_accum + micro
            generator = torch.Generator(device=self.device).manual_seed(config.seed * 7_919 + step)
            self.dictionary.update(
                out.features.detach().float(), downsample_labels(labels, out.features.shape[-2:]),
                max_per_class=config.cosine.max_per_class, generator=generator, check_values=check,
            )
        if not needs_target:
            return stats

        self.criterion.check_values = check
        target_images = target[0].to(self.device, non_blocking=True)
        with self._gradient_sync(last):
            with self._autocast():
                out_t = self.net(target_images)
                pseudo = pseudo_labels(out_t.logits, config.cosine.pseudo_threshold, config.cosine.class_cap)
                # The zero term puts every parameter in this backward's graph: DDP reduces the
                # gradients accumulated over the iteration in it, and expects all of them there.
                total = 0.0 * out_t.logits.float().mean()
                if weight > 0:
                    loss_cos = self.criterion(out_t.features, pseudo)
                    total = total + weight * loss_cos
                    stats["loss_cos"] = loss_cos
                    stats["selected"] = self.criterion.last_selected_fraction
                if config.entropy.weight > 0:
                    loss_ent = entropy_loss(out_t.logits)
                    total = total + config.entropy.weight * loss_ent
                    stats["loss_ent"] = loss_ent
            self._backward(total)
        stats["pseudo_kept"] = (pseudo != IGNORE_INDEX).float().mean()
        stats["pseudo_share"] = class_shares(pseudo, NUM_CLASSES)
        return stats

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Run from the current iteration to the end (or to iteration ``until``, then save a
        checkpoint and stop, as a killed run would have); returns the last evaluation."""
        config, context = self.config, self.context
        if self.iteration >= config.train.iterations:
            if context.is_main:
                print(f"the run in {self.run_dir} has finished ({self.iteration} iterations); --resume none starts it over")
                if not any((self.run_dir / "overlays").glob("*.png")):  # killed after its last checkpoint
                    self._write_final_outputs()
            return next((dict(row["eval"]) for row in reversed(self.history) if "eval" in row), {})
        stop = config.train.iterations if until is None else min(until, config.train.iterations)
        streams = [
            batch_stream(dataset, batch, config.seed + offset, rank=context.rank, world=context.world,
                         start=self.iteration * config.train.grad_accum, num_workers=config.data.num_workers,
                         flip=config.data.flip)
            for dataset, batch, offset in (
                (self.source, config.train.batch_size_source, 0),
                (self.target, config.train.batch_size_target, 1),
            )
        ]
        self.net.train()
        stats = self.stats
        bar = reporting.progress(config.train.iterations, self.iteration, "train", enabled=self.progress)
        window_start, window_first, paused, result = time.perf_counter(), self.iteration, 0.0, {}
        while self.iteration < stop:
            iteration = self.iteration
            factor = poly_factor(config, iteration)
            for group in self.optimizer.param_groups:
                group["lr"] = config.optim.lr * factor * group["lr_mult"]
            try:  # the step: its passes, and the optimizer's state on the first one
                for micro in range(config.train.grad_accum):
                    stats.add(self._micro_step(next(streams[0]), next(streams[1]), iteration, micro))
                self.scaler.step(self.optimizer)
            except torch.cuda.OutOfMemoryError as error:
                raise memory.out_of_memory(error, config, iteration) from error
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.iteration += 1
            bar.update(1)

            done = self.iteration == config.train.iterations
            if self.iteration % config.train.log_every == 0 or done:
                elapsed = time.perf_counter() - window_start - paused  # training alone
                row = {"iteration": self.iteration, **stats.means(self.context), "lr": config.optim.lr * factor,
                       "weight_cos": loss_weight(config, iteration),
                       "it_per_s": (self.iteration - window_first) / elapsed,
                       "peak_mib": memory.peak_memory_mib(self.device)}
                self._log(row, bar)
                check_finite(row, config)
                window_start, window_first, paused = time.perf_counter(), self.iteration, 0.0
            pause_start = time.perf_counter()
            if self.iteration % config.train.eval_every == 0 or done:
                result = self.evaluate_and_keep(done)
                self.net.train()
            elif self.iteration % config.train.checkpoint_every == 0:
                self.save_checkpoint("last")
            paused += time.perf_counter() - pause_start
        bar.close()
        if self.iteration < config.train.iterations:
            self.save_checkpoint("last")
            return result
        if context.is_main:
            self._write_final_outputs()
        return result

    def _write_final_outputs(self) -> None:
        """The curves, then the overlays (written last: their presence marks a complete run)."""
        reporting.plot_curves(self.history, self.run_dir)
        reporting.write_overlays(self.model, self.val, self.device, self.run_dir / "overlays")

    def _log(self, row: dict[str, Any], bar) -> None:
        self.history.append(row)
        if not self.context.is_main:
            return
        reporting.append_metrics(row, self.run_dir)
        if not self.progress:
            return
        if reporting.live_bars():
            bar.set_postfix_str(reporting.brief(row))
        else:
            print(f"iteration {row['iteration']}/{self.config.train.iterations}: {reporting.brief(row)}, "
                  f"{row['it_per_s']:.2f} it/s", flush=True)

    def evaluate_and_keep(self, final: bool) -> dict[str, Any]:
        distributed.broadcast_buffers(self.model, self.context)  # every rank scores rank 0's model
        matrix = evaluate(self.model, self.val, self.device, self.context, progress=self.progress)
        protocols = self.config.data.protocols
        summary = {"iteration": self.iteration, **matrix.summary(protocols), "pixels": int(matrix.matrix.sum())}
        miou = summary[f"mIoU{protocols[0]}"]
        self.history.append({"iteration": self.iteration, "eval": summary})
        if self.context.is_main:
            reporting.append_metrics({"iteration": self.iteration, "eval": summary}, self.run_dir)
            if final:
                print(matrix.table(protocols, title=f"target val, iteration {self.iteration}"))
        if miou > self.best_miou:
            self.best_miou = miou
            self.save_checkpoint("best")
        self.save_checkpoint("last")
        return {**summary, "table": matrix.table(protocols)}


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device: torch.device, context=None, *, progress: bool = False) -> ConfusionMatrix:
    """Confusion matrix on ``dataset`` at full label resolution (logits upsampled bilinearly).

    Under DDP each rank scores ``indices[rank::world]`` (no padded duplicates) and the counts
    are summed across ranks.
    """
    model.eval()
    rank, world = (context.rank, context.world) if context is not None else (0, 1)
    matrix = ConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE_INDEX, device=device)
    indices = range(rank, len(dataset), world)
    for index in reporting.progress_iter(indices, "eval", enabled=progress):
        image, label, _ = dataset[index]
        logits = model(image[None].to(device)).logits
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        matrix.update(logits.argmax(dim=1)[0], label.to(device))
    if world > 1:
        matrix.all_reduce()
    return matrix
