"""Short training runs: outputs, exact resume, atomic checkpoints, the levers, errors."""

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from cossim_fast.data import IGNORE_INDEX, DatasetError
from cossim_fast.training import ConfigError, Trainer, checkpoint
from cossim_fast.training import trainer as trainer_module
from cossim_fast.training.source_loss import upsampled_cross_entropy
from cossim_fast.training.streams import batch_stream
from cossim_fast.training.trainer import loss_weight


def _weights(trainer):
    return {name: value.clone() for name, value in trainer.model.state_dict().items()}


def test_short_run_writes_metrics_plots_and_checkpoints(tiny_config):
    config = tiny_config("entropy.weight=0.1")
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    run = trainer.run_dir
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "eval.csv", "loss.png", "miou.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert len(list((run / "overlays").glob("*.png"))) == 3
    rows = [json.loads(line, parse_constant=pytest.fail) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss_ce" in r]
    assert [r["iteration"] for r in train_rows] == [2, 4, 6]
    for key in ("loss_cos", "loss_ent", "selected", "pseudo_share", "lr", "it_per_s", "peak_mib"):
        assert key in train_rows[-1], key
    assert len(train_rows[-1]["pseudo_share"]) == 19
    assert 0.0 <= result["mIoU19"] <= 1.0 and "| road |" in result["table"]
    assert trainer.dictionary.counts.sum() > 0


def test_resumed_run_reaches_the_same_weights(tiny_config):
    straight = Trainer(tiny_config(output="straight"), progress=False)
    straight.train()
    first = Trainer(tiny_config(output="interrupted"), progress=False)
    first.train(until=4)
    resumed = Trainer(tiny_config(output="interrupted"), progress=False)  # resume="auto"
    assert resumed.iteration == 4
    resumed.train()
    for name, value in _weights(straight).items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert torch.equal(straight.dictionary.bank, resumed.dictionary.bank)
    # The loaders a resume starts draw from their own generator: the global RNG goes on as if
    # the run had not stopped.
    saved = [checkpoint.load(run.run_dir / "checkpoints" / "last.pt")["rng"] for run in (straight, resumed)]
    assert torch.equal(saved[0]["torch"], saved[1]["torch"])


@pytest.mark.parametrize(
    "lever, tolerance",
    [
        # On the CPU the recomputation repeats the first pass's ops exactly: bitwise equal.
        ("model.activation_checkpointing=true", dict(rtol=0, atol=0)),
        # grid_sample's bands sum the loss in another order: equal up to rounding.
        ("train.ce_bands=5", dict(rtol=1e-4, atol=1e-6)),
    ],
)
def test_memory_levers_train_the_same_model(tiny_config, lever, tolerance, monkeypatch):
    common = ("train.device=cpu", "train.iterations=3", "train.eval_every=3")
    plain = Trainer(tiny_config(*common, output="plain"), progress=False)
    plain.train()
    bands = []  # the lever must reach the code it names
    loss = trainer_module.upsampled_cross_entropy
    monkeypatch.setattr(trainer_module, "upsampled_cross_entropy", lambda *a, **k: bands.append(k["bands"]) or loss(*a, **k))
    lean = Trainer(tiny_config(lever, *common, output="lean"), progress=False)
    lean.train()
    assert lean.model.backbone.activation_checkpointing == ("checkpointing" in lever)
    assert set(bands) == ({5} if "ce_bands" in lever else {1})
    losses = [[row["loss_ce"] for row in run.history if "loss_ce" in row] for run in (plain, lean)]
    assert losses[0] and losses[0] == pytest.approx(losses[1], rel=tolerance["rtol"])
    for name, value in _weights(plain).items():
        torch.testing.assert_close(lean.model.state_dict()[name], value, msg=name, **tolerance)
    torch.testing.assert_close(lean.dictionary.bank, plain.dictionary.bank, **tolerance)


def _logged(trainer) -> list[str]:
    """The history without its timings, as JSON (the IoU of an absent class is NaN, not equal to itself)."""
    timing = {"it_per_s", "peak_mib"}
    return [json.dumps({key: value for key, value in row.items() if key not in timing}) for row in trainer.history]


def test_a_resume_between_logged_rows_logs_what_an_uninterrupted_run_logs(tiny_config):
    settings = ("train.log_every=4", "train.checkpoint_every=100")  # rows at 4 and 6, the stop at 2
    straight = Trainer(tiny_config(*settings, output="straight"), progress=False)
    straight.train()
    Trainer(tiny_config(*settings, output="interrupted"), progress=False).train(until=2)
    resumed = Trainer(tiny_config(*settings, output="interrupted"), progress=False)
    resumed.train()
    assert [row["iteration"] for row in straight.history] == [3, 4, 6, 6]  # evaluations at 3 and 6
    assert _logged(resumed) == _logged(straight)  # the row at 4 averages iterations 1 to 4 in both


def test_resume_drops_rows_logged_after_the_checkpoint_and_names_config_changes(tiny_config, capsys):
    Trainer(tiny_config(output="run"), progress=False).train(until=4)
    metrics = tiny_config(output="run").output_dir + "/metrics.jsonl"
    with open(metrics, "a") as stream:  # logged after the checkpoint, then the run was killed
        stream.write(json.dumps({"iteration": 5, "loss_ce": 1.0}) + "\n")
    resumed = Trainer(tiny_config("cosine.weight=0.5", "train.log_every=3", "model.activation_checkpointing=true",
                                  output="run"), progress=False)
    out = capsys.readouterr().out
    assert "config differs" in out and "cosine.weight: 0.1 -> 0.5" in out
    assert "log_every" not in out and "activation_checkpointing" not in out  # how it runs, not what
    rows = [json.loads(line) for line in open(metrics)]
    assert max(row["iteration"] for row in rows) == 4 and len(rows) == len(resumed.history)


def test_resume_takes_the_new_optimizer_settings(tiny_config):
    Trainer(tiny_config(output="run"), progress=False).train(until=2)
    resumed = Trainer(tiny_config("optim.weight_decay=0.01", "optim.momentum=0.5", "optim.head_lr_mult=2.0",
                                  output="run"), progress=False)
    assert resumed.iteration == 2
    groups = resumed.optimizer.param_groups
    assert all(g["weight_decay"] == 0.01 and g["momentum"] == 0.5 for g in groups)
    assert sorted(g["lr_mult"] for g in groups) == [1.0, 2.0]
    assert len(resumed.optimizer.state) > 0  # the momentum buffers came back


@pytest.mark.parametrize(
    "change", ["optim.name=adamw", "cosine.slots_per_class=32", "model.feature_point=pre_activation", "model.freeze_bn=true"]
)
def test_resume_refuses_settings_its_state_was_not_made_with(tiny_config, change):
    Trainer(tiny_config(output="run"), progress=False).train(until=2)
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"cannot resume from .*last\.pt.*{key}"):
        Trainer(tiny_config(change, output="run"), progress=False)
    Trainer(tiny_config(change, output="run"), resume=None, progress=False)  # a new run may


def test_a_finished_run_killed_before_its_plots_writes_them_when_started_again(tiny_config, capsys):
    config = tiny_config("train.iterations=2", "train.eval_every=2")
    run_dir = Trainer(config, progress=False).run_dir
    Trainer(config, progress=False).train()
    for path in [run_dir / "loss.png", *(run_dir / "overlays").glob("*.png")]:
        path.unlink()  # as if killed after the final checkpoint
    Trainer(config, progress=False).train()
    assert "has finished" in capsys.readouterr().out
    assert (run_dir / "loss.png").is_file() and any((run_dir / "overlays").glob("*.png"))


def test_init_from_a_checkpoint_of_another_model_names_the_key(tiny_config):
    Trainer(tiny_config(output="small"), progress=False).train(until=2)
    source = tiny_config(output="small").output_dir + "/checkpoints/last.pt"
    with pytest.raises(ConfigError, match=r"model.init_from: .*last\.pt holds a deeplabv2_small, not a deeplabv2_resnet18"):
        Trainer(tiny_config("model.name=deeplabv2_resnet18", f"model.init_from={source}", output="big"), progress=False)


def test_a_split_of_a_dataset_without_splits_is_reported_as_ignored(tiny_config, tiny_data, capsys):
    config = tiny_config("data.val.kind=gta5", f"data.val.root={tiny_data}/gta5")  # data.val.split stays "val"
    trainer_module.make_dataset(config.data.val, "data.val", labels=True)
    assert "data.val.split='val' is ignored: gta5 has no splits" in capsys.readouterr().out
    trainer_module.make_dataset(config.data.val, "data.val", labels=True, warn=False)  # DDP ranks but the first
    assert capsys.readouterr().out == ""
    trainer_module.make_dataset(config.data.source, "data.source", labels=True)
    assert "ignored" not in capsys.readouterr().out


def test_resume_into_fp16_loss_scaling_starts_a_new_scaler(tiny_config, monkeypatch):
    Trainer(tiny_config(output="run"), progress=False).train(until=2)  # no scaling: its state is empty
    assert checkpoint.load(tiny_config(output="run").output_dir + "/checkpoints/last.pt")["scaler"] == {}
    resumed = Trainer(tiny_config("train.amp=fp16", output="run"), progress=False)
    assert resumed.iteration == 2 and resumed.scaler.is_enabled()


def test_a_new_run_in_an_old_folder_starts_its_metrics_afresh(tiny_config, capsys):
    config = tiny_config("train.iterations=4", "train.eval_every=4")
    Trainer(config, progress=False).train()
    Trainer(config, resume=None, progress=False).train()
    assert "starting a new run" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(config.output_dir + "/metrics.jsonl")]
    assert [row["iteration"] for row in rows] == [2, 4, 4]  # one run's rows: two logs, one evaluation
    assert all(row["it_per_s"] > 0 for row in rows if "it_per_s" in row)


def test_freeze_bn_false_holds_with_pretrained_weights(tiny_config, tmp_path):
    from cossim_fast.models import build_model

    backbone = build_model("deeplabv2_small", 19, random_init_notice=False).backbone
    path = tmp_path / "backbone.pth"
    torch.save(dict(backbone.state_dict()), path)  # torchvision's layout, without the classifier
    for setting, frozen in (("false", False), ("true", True), ("null", True)):  # null: frozen with weights
        trainer = Trainer(tiny_config(f"model.pretrained={path}", f"model.freeze_bn={setting}", output=setting), progress=False)
        assert trainer.model.backbone.freeze_bn is frozen, setting


def test_each_accumulation_pass_draws_its_own_dictionary_order(tiny_config, monkeypatch):
    import cossim_fast

    seeds = []
    update = cossim_fast.FeatureDictionary.update

    def recording(self, *args, generator=None, **kwargs):
        seeds.append(generator.initial_seed())
        return update(self, *args, generator=generator, **kwargs)

    monkeypatch.setattr(cossim_fast.FeatureDictionary, "update", recording)
    Trainer(tiny_config("train.grad_accum=2", "train.iterations=2", "train.eval_every=2"), progress=False).train()
    assert len(seeds) == 4 and len(set(seeds)) == 4  # two iterations of two passes


def test_a_write_killed_midway_leaves_no_temporary_behind_the_next_save(tmp_path):
    stale = tmp_path / ".last.pt.abc123.tmp"  # what SIGKILL during a save leaves
    stale.write_bytes(b"partial")
    checkpoint.save_atomic({"iteration": 1}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_finished_run_says_so_and_returns_its_last_evaluation(tiny_config, capsys):
    config = tiny_config("train.iterations=2", "train.eval_every=2")
    first = Trainer(config, progress=False).train()
    again = Trainer(config, progress=False).train()
    assert "has finished (2 iterations)" in capsys.readouterr().out
    assert again["mIoU19"] == first["mIoU19"] and again["iteration"] == 2


def test_dictionary_fills_during_the_loss_warm_up(tiny_config):
    trainer = Trainer(tiny_config("cosine.warmup_iters=1000", "train.iterations=2", "train.eval_every=2"), progress=False)
    trainer.train()
    assert trainer.dictionary.counts.sum() > 0
    assert "loss_cos" not in trainer.history[0]


def test_checkpoint_files_are_readable_as_the_umask_allows(tmp_path):
    path = tmp_path / "last.pt"
    state = {"model": {}, "config": "{}"}
    checkpoint.save_atomic({**state, "iteration": 1}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    state = {"model": {}, "config": "{}"}
    checkpoint.save_atomic({**state, "iteration": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed halfway through writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({**state, "iteration": 2}, path)
    assert checkpoint.load(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_loss_weight_warmup_and_ramp(tiny_config):
    config = tiny_config("cosine.weight=0.5", "cosine.warmup_iters=10", "cosine.ramp_iters=4")
    assert [loss_weight(config, i) for i in (0, 9, 10, 11, 13, 20)] == [0.0, 0.0, 0.125, 0.25, 0.5, 0.5]
    assert loss_weight(tiny_config("cosine.enabled=false"), 100) == 0.0


def test_source_only_run_skips_the_target_pass(tiny_config):
    trainer = Trainer(tiny_config("cosine.enabled=false", "train.iterations=2", "train.eval_every=2"), progress=False)
    trainer.train()
    train_rows = [r for r in trainer.history if "loss_ce" in r]
    assert "loss_cos" not in train_rows[-1] and trainer.dictionary.counts.sum() == 0


def test_pre_activation_features_and_all_mode_run(tiny_config):
    trainer = Trainer(tiny_config("model.feature_point=pre_activation", "cosine.mode=all", "train.iterations=2"), progress=False)
    trainer.train()
    assert trainer.dictionary.counts.sum() > 0


def test_missing_dataset_is_reported_before_training(tiny_config, tmp_path):
    with pytest.raises(DatasetError, match="missing folder"):
        Trainer(tiny_config(f"data.target.root={tmp_path / 'nowhere'}"), progress=False)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_run(tiny_config, amp):
    trainer = Trainer(tiny_config(f"train.amp={amp}", "train.iterations=3", "train.eval_every=3"), progress=False)
    result = trainer.train()
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    train_rows = [r for r in trainer.history if "loss_ce" in r]
    assert all(torch.isfinite(torch.tensor(r["loss_cos"])) for r in train_rows) and result["pixels"] > 0


def test_start_from_a_source_only_checkpoint(tiny_config):
    source_only = Trainer(tiny_config("cosine.enabled=false", "train.iterations=2", "train.eval_every=2", output="source_only"), progress=False)
    source_only.train()
    path = source_only.run_dir / "checkpoints" / "last.pt"
    adapted = Trainer(tiny_config(f"model.init_from={path}", output="adapted"), progress=False)
    for name, value in source_only.model.state_dict().items():
        assert torch.equal(adapted.model.state_dict()[name], value), name
    assert adapted.iteration == 0


def test_without_a_terminal_progress_is_a_line_per_log_step(tiny_config, capsys):
    # Under pytest stderr is not a terminal, as in a job whose output goes to a file: no bar
    # redraws or cursor moves, one plain line per log step instead.
    Trainer(tiny_config("cosine.enabled=false", "train.iterations=4", "train.eval_every=4"), resume=None).train()
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert [line.split(":")[0] for line in lines] == ["iteration 2/4", "iteration 4/4"], out
    assert "it/s" in lines[0] and "\r" not in err and "\x1b[" not in err


def test_a_finished_run_keeps_the_config_it_ran_with(tiny_config, capsys):
    config = tiny_config("train.iterations=2", "train.eval_every=2")
    Trainer(config, progress=False).train()
    saved = (Path(config.output_dir) / "config.yaml").read_text()
    Trainer(tiny_config("train.iterations=2", "train.eval_every=2", "cosine.weight=0.5"), progress=False).train()
    assert "has finished" in capsys.readouterr().out
    assert (Path(config.output_dir) / "config.yaml").read_text() == saved


def test_paths_are_checked_before_any_data_is_generated(tiny_config, tmp_path):
    synthetic = tmp_path / "synthetic"
    config = tiny_config("data.synthetic.enabled=true", f"data.synthetic.root={synthetic}")
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.pt does not exist"):
        Trainer(config, resume=str(tmp_path / "missing.pt"), progress=False)
    with pytest.raises(ConfigError, match=r"model.init_from: .*nothing.pt is not a file"):
        Trainer(tiny_config("data.synthetic.enabled=true", f"data.synthetic.root={synthetic}",
                            f"model.init_from={tmp_path / 'nothing.pt'}"), progress=False)
    assert not synthetic.exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir: .*a_file exists and is not a folder"):
        Trainer(tiny_config(output="a_file"), progress=False)


def test_a_run_whose_loss_is_not_finite_stops_with_a_clear_error(tiny_config, monkeypatch, capsys):
    loss = trainer_module.upsampled_cross_entropy
    monkeypatch.setattr(trainer_module, "upsampled_cross_entropy", lambda *a, **k: loss(*a, **k) * float("nan"))
    trainer = Trainer(tiny_config(), progress=False)
    with pytest.raises(trainer_module.TrainingDivergedError, match="loss_ce = nan in the steps logged at iteration 2: training diverged"):
        trainer.train()
    assert trainer.iteration == 2
    row = {"iteration": 4, "loss_ce": float("inf")}
    trainer_module.check_finite(row, tiny_config("train.amp=fp16"))  # the scaler skips such steps
    assert "warning: loss_ce = inf in the steps logged at iteration 4 (fp16 loss scaling" in capsys.readouterr().out
    trainer_module.check_finite({"iteration": 4, "loss_ce": 1.0}, tiny_config())


def _record_step_gradients(trainer) -> list[dict[str, torch.Tensor]]:
    """The gradients each optimizer step applies, recorded as the step starts."""
    recorded, step = [], trainer.optimizer.step

    def recording(*args, **kwargs):
        recorded.append({name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return recorded


def test_accumulated_passes_step_with_the_mean_of_their_gradients(tiny_config):
    # grad_accum passes make one step on the mean of their losses, as one batch of all their
    # samples would: the oracle differentiates that mean directly, from the same start weights.
    config = tiny_config("train.grad_accum=2", "cosine.enabled=false")
    trainer = Trainer(config, progress=False)
    model = copy.deepcopy(trainer.model).train()
    gradients = _record_step_gradients(trainer)
    trainer.train(until=1)
    stream = batch_stream(trainer.source, config.train.batch_size_source, config.seed, flip=config.data.flip)
    losses = [upsampled_cross_entropy(model(images).logits, labels, ignore_index=IGNORE_INDEX)
              for images, labels in (next(stream), next(stream))]
    (sum(losses) / len(losses)).backward()
    assert len(gradients) == 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(gradients[0][name], p.grad, msg=name)


def test_entropy_only_run_logs_and_weights_the_entropy_term(tiny_config):
    # cosine.weight=0 with entropy on: the target pass runs for the entropy alone. The step's
    # gradient is CE's plus entropy.weight times the entropy's, so it is linear in the weight.
    def first_step(entropy_weight, output):
        trainer = Trainer(tiny_config("cosine.weight=0.0", f"entropy.weight={entropy_weight}", "train.log_every=1",
                                      output=output), progress=False)
        gradients = _record_step_gradients(trainer)
        trainer.train(until=1)
        return gradients[0], trainer.history

    plain, _ = first_step(0.0, "plain")  # no target pass at all: the source CE's gradient
    (once, once_rows), (twice, twice_rows) = first_step(1.0, "once"), first_step(2.0, "twice")
    for rows in (once_rows, twice_rows):
        assert "loss_cos" not in rows[0] and 0 < rows[0]["loss_ent"] <= 1  # normalized by log K
    assert once_rows[0]["loss_ent"] == twice_rows[0]["loss_ent"]  # logged unweighted: same weights, same batch
    assert any((once[name] - plain[name]).abs().max() > 1e-6 for name in plain)
    for name, value in plain.items():
        torch.testing.assert_close(twice[name] - value, 2 * (once[name] - value), rtol=1e-3, atol=1e-6, msg=name)


def test_logged_cosine_weight_follows_the_warm_up_and_ramp(tiny_config):
    # Each row (one iteration each) logs lambda_cos of its iteration: 0 during the warm-up of
    # 2 iterations, then weight * (i - 2 + 1) / 2 up to the full 0.5; loss_cos only once it is on.
    trainer = Trainer(tiny_config("cosine.weight=0.5", "cosine.warmup_iters=2", "cosine.ramp_iters=2",
                                  "train.log_every=1", "train.eval_every=100"), progress=False)
    trainer.train(until=5)
    expected = [0.0, 0.0, 0.25, 0.5, 0.5]  # iterations 0 to 4
    assert [row["weight_cos"] for row in trainer.history] == expected
    assert ["loss_cos" in row for row in trainer.history] == [w > 0 for w in expected]
