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
                  "data.synthetic.num_target_val=2", "data.synthetic.size=[32, 16]"])
    assert cli.main(["generate-data", *sets]) == 0
    assert (tmp_path / "gta5" / "images").is_dir() and (tmp_path / "cityscapes" / "gtFine" / "val").is_dir()


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["train", "--set", "cosine.wieght=1"]) == 2
    assert "error: unknown key cosine.wieght" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    # A data set error names the config key to change.
    assert cli.main(["train", "--config", "gta2cs_deeplabv2", "--set", f"data.source.root={tmp_path / 'nowhere'}"]) == 2
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
