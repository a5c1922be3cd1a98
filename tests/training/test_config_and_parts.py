"""Config validation, resumable batch streams, pseudo-labels with the class cap."""

import pytest
import torch

from cossim_fast import configs
from cossim_fast.training import ConfigError, load_config
from cossim_fast.training.config import save_config
from cossim_fast.training.streams import IterationBatches, flips
from cossim_fast.training.target_losses import class_shares, entropy_loss, pseudo_labels


@pytest.mark.parametrize("name", configs.names())
def test_shipped_configs_load(name):
    load_config(configs.resolve(name))


@pytest.mark.parametrize(
    "text, match",
    [
        ("cosine:\n  wieght: 0.1\n", "unknown key cosine.wieght"),
        ("train:\n  iterations: 1.5\n", "train.iterations: expected int"),
        ("train:\n  log_every: true\n", "train.log_every: expected int, got bool"),
        ("cosine:\n  mode: mean\n", r"cosine.mode: expected one of \('max', 'all'\)"),
        ("data:\n  source:\n    size: [128, x]\n", r"data.source.size\[1\]: expected int"),
        ("model: resnet\n", "model: expected a mapping"),
        ("- 1\n", "expected a mapping at the top level"),
        ("train:\n  iterations: 0\n", "train.iterations, train.grad_accum and train.check_values_every must be >= 1"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, text, match):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_overrides_defaults_and_round_trip(tmp_path):
    config = load_config(None, ["cosine.weight=1", "cosine.max_per_class=null", "data.target.root=/x"])
    assert config.cosine.weight == 1.0 and config.cosine.max_per_class is None
    assert config.data.target.kind == "cityscapes"  # a nested section keeps its parent's default
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["cosine.weight"])
    with pytest.raises(FileNotFoundError, match="no shipped config"):
        configs.resolve("no_such_config")


def test_batch_streams_resume_and_split_across_ranks():
    stream = IterationBatches(10, 3, seed=5)
    whole = [stream.batch(i) for i in range(7)]  # crosses two epoch boundaries
    for epoch in range(2):
        assert sorted(sum(whole, [])[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    resumed = iter(IterationBatches(10, 3, seed=5, start=4))
    assert [next(resumed) for _ in range(3)] == whole[4:]
    ranks = [IterationBatches(10, 3, seed=5, rank=r, world=2).batch(2) for r in range(2)]
    combined = IterationBatches(10, 6, seed=5).batch(2)
    assert ranks[0] + ranks[1] == combined
    assert torch.equal(torch.cat([flips(1, 2, 3, r, 2) for r in range(2)]), flips(1, 2, 6, 0, 1))


def test_pseudo_labels_threshold_and_class_cap():
    logits = torch.full((1, 3, 2, 5), -10.0)
    logits[0, 0, :, :4] = torch.tensor([5.0, 4.0, 3.0, 2.0])  # 8 confident class-0 pixels
    logits[0, 1, :, 4] = 5.0  # 2 class-1 pixels
    plain = pseudo_labels(logits, 0.5, None)
    assert (plain == 0).sum() == 8 and (plain == 1).sum() == 2
    capped = pseudo_labels(logits, 0.5, 0.3)  # at most floor(0.3 * 10) = 3 per class
    assert (capped == 0).sum() == 3 and (capped == 1).sum() == 2
    assert (capped[0, :, 0] == 0).all()  # the most confident ones are kept
    strict = pseudo_labels(logits, 0.9999999, None)
    assert (strict == 255).all()
    torch.testing.assert_close(class_shares(plain, 3), torch.tensor([0.8, 0.2, 0.0]))


def test_entropy_is_normalized():
    assert entropy_loss(torch.zeros(2, 19, 3, 3)).item() == pytest.approx(1.0)
    assert entropy_loss(torch.tensor([[[[50.0]], [[0.0]]]])).item() == pytest.approx(0.0, abs=1e-6)
