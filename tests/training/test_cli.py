"""The command line: train, evaluate, generate-data, and clear errors for bad input."""

import pytest

from cossim_fast import cli
from cossim_fast.training import load_config
from conftest import tiny_overrides


def _sets(overrides):
    return [item for override in overrides for item in ("--set", override)]


def test_train_then_evaluate(tiny_data, tmp_path, capsys):
    overrides = tiny_overrides(tiny_data, tmp_path / "run", "train.iterations=2", "train.eval_every=2")
    assert cli.main(["train", *_sets(overrides)]) == 0
    assert cli.main(["evaluate", str(tmp_path / "run" / "checkpoints" / "last.pt")]) == 0
    assert "mIoU19" in capsys.readouterr().out


def test_evaluate_takes_overrides_on_the_checkpoints_config(tiny_data, tmp_path, capsys):
    overrides = tiny_overrides(tiny_data, tmp_path / "run", "train.iterations=2", "train.eval_every=2")
    assert cli.main(["train", *_sets(overrides)]) == 0
    last = str(tmp_path / "run" / "checkpoints" / "last.pt")
    assert cli.main(["evaluate", last, "--set", f"data.val.root={tmp_path / 'elsewhere'}"]) == 2
    assert "elsewhere" in capsys.readouterr().err  # the override was used, not silently dropped
    assert cli.main(["evaluate", last, "--set", "data.protocols=[19, 16]"]) == 0
    assert "mIoU16" in capsys.readouterr().out
    assert cli.main(["evaluate", last, "--set", "model.name=deeplabv2_resnet18"]) == 2
    assert "holds a deeplabv2_small" in capsys.readouterr().err


def test_generate_data(tmp_path, capsys):
    sets = _sets([f"data.synthetic.root={tmp_path}", "data.synthetic.num_source=2", "data.synthetic.num_target_train=2",
                  "data.synthetic.num_target_val=2", "data.synthetic.size=[32, 16]", "data.synthetic.num_source_val=3"])
    assert cli.main(["generate-data", *sets]) == 0
    assert (tmp_path / "gta5" / "images").is_dir() and (tmp_path / "cityscapes" / "gtFine" / "val").is_dir()
    assert len(list((tmp_path / "gta5_val" / "images").glob("*.png"))) == 3  # the held-out source set


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["train", "--set", "cosine.wieght=1"]) == 2
    assert "error: unknown key cosine.wieght" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    # A data set error names the config key to change.
    assert cli.main(["train", "--config", "gta2cs_deeplabv2"]) == 2  # paths first, before any data is scanned
    assert "error: model.pretrained: pretrained/resnet101-imagenet.pth is not a file" in capsys.readouterr().err
    assert cli.main(["train", "--config", "gta2cs_deeplabv2", "--set", "model.pretrained=null",
                     "--set", f"data.source.root={tmp_path / 'nowhere'}"]) == 2
    assert "error: data.source (data.source.kind=gta5, data.source.root=" in capsys.readouterr().err
    # Files that are not checkpoints: text, and a tensor file without a checkpoint's keys.
    (tmp_path / "config.yaml").write_text("model: {name: deeplabv2_small}\n")
    import torch

    torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pt")
    for name, why in (("config.yaml", "cannot be read as a checkpoint of cossim-fast train"), ("weights.pt", "it has no model, config, iteration")):
        assert cli.main(["evaluate", str(tmp_path / name)]) == 2
        assert why in capsys.readouterr().err


def test_out_of_memory_names_the_levers_left(tiny_data, tmp_path, capsys, monkeypatch):
    import torch

    from cossim_fast.training import Trainer

    def allocation_fails(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "_micro_step", allocation_fails)
    overrides = tiny_overrides(tiny_data, tmp_path / "run", "train.iterations=2", "train.amp=bf16")
    assert cli.main(["train", *_sets(overrides)]) == 3
    err = capsys.readouterr().err
    assert "out of device memory in training iteration 0" in err and "Tried to allocate 2.00 GiB" in err
    assert "model.activation_checkpointing=true" in err and "train.grad_accum=2" in err
    assert "train.amp=bf16" not in err  # already on: not suggested
    lean = tiny_overrides(tiny_data, tmp_path / "lean", "model.activation_checkpointing=true", "train.batch_size_source=1",
                          "train.batch_size_target=1")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="train.amp=bf16") as raised:
        Trainer(load_config(None, lean), progress=False).train()  # still an OutOfMemoryError to callers
    assert "activation_checkpointing" not in str(raised.value) and "grad_accum" not in str(raised.value)


def test_demo_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch):
    # demo parses its own options, but its input mistakes get the same handling as train's.
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--set", "train.iterationz=1"]) == 2
    assert capsys.readouterr().err.startswith("cossim-fast demo: error: unknown key train.iterationz")
    assert cli.main(["demo", "--config", "nope"]) == 2
    assert capsys.readouterr().err.startswith("cossim-fast demo: error: no config file 'nope'")
    assert not (tmp_path / "runs").exists()  # refused before any run started


def test_dataloader_worker_error_is_the_original_message(tmp_path, capsys):
    # torch re-raises a worker's error with the worker's whole traceback as its message.
    from cossim_fast.data import generate_synthetic_uda

    generate_synthetic_uda(tmp_path / "data", seed=0, num_source=2, num_source_val=1, num_target_train=2, num_target_val=1, size=(48, 32))
    broken = sorted((tmp_path / "data" / "gta5" / "images").glob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "run", "train.iterations=1", "data.num_workers=1")
    assert cli.main(["train", *_sets(overrides)]) == 2
    err = capsys.readouterr().err
    assert err == f"cossim-fast train: error: cannot read image {broken}: image file is truncated\n"


def test_error_message_of_a_worker_error_keeps_every_line_of_the_original():
    from torch._utils import ExceptionWrapper

    from cossim_fast.data import DatasetError

    def reraised(error: Exception) -> Exception:
        try:
            try:
                raise OSError("the cause")
            except OSError as cause:
                raise error from cause
        except Exception:
            wrapper = ExceptionWrapper(where="in DataLoader worker process 3")
        try:
            wrapper.reraise()
        except Exception as again:
            return again
        raise AssertionError("reraise returned")

    listed = "data.source (2 problem(s)):\n  - a.png: too small\n  - b.png: no label"
    assert cli.error_message(reraised(DatasetError(listed))) == listed
    assert cli.error_message(reraised(FileNotFoundError("no file x.png"))) == "no file x.png"
    assert cli.error_message(DatasetError(listed)) == listed  # not from a worker: as it is


def test_a_diverged_run_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from cossim_fast.training import TrainingDivergedError, Trainer

    def diverge(self, until=None):
        raise TrainingDivergedError("loss_ce = nan in the steps logged at iteration 2: training diverged")

    monkeypatch.setattr(Trainer, "__init__", lambda self, config, resume=None: setattr(self, "context", None))
    monkeypatch.setattr(Trainer, "train", diverge)
    assert cli.main(["train", "--set", f"output_dir={tmp_path}"]) == 3
    assert capsys.readouterr().err == "cossim-fast train: error: loss_ce = nan in the steps logged at iteration 2: training diverged\n"
