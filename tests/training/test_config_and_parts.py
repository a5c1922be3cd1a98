"""Config validation, resumable batch streams, pseudo-labels with the class cap."""

import pytest
import torch

from cossim_fast import configs
from cossim_fast.training import ConfigError, load_config
from cossim_fast.training import checkpoint
from cossim_fast.training.config import check_resumable, config_changes, config_from_dict, save_config, to_dict
from cossim_fast.training.streams import CachedDataset, IterationBatches, flips
from cossim_fast.training.target_losses import class_shares, downsample_labels, entropy_loss, pseudo_labels


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
        ("train:\n  iterations: 0\n", "train.iterations: expected >= 1, got 0"),
        ("train:\n  log_every: 0\n", "train.log_every: expected >= 1, got 0"),
        ("train:\n  batch_size_source: 0\n", "train.batch_size_source: expected >= 1"),
        ("data:\n  protocols: [15]\n", r"data.protocols: expected a non-empty list of distinct class counts from \[19, 16, 13\]"),
        ("data:\n  protocols: []\n", "data.protocols: expected a non-empty list"),
        ("data:\n  protocols: [19, 13, 19]\n", "data.protocols: expected a non-empty list of distinct"),
        ("data:\n  source:\n    size: [48]\n", r"data.source.size: expected \[width, height\]"),
        ("cosine:\n  threshold: 2.0\n", r"cosine.threshold: expected in \[-1, 1\], got 2.0"),
        ("cosine:\n  class_cap: 0.0\n", r"cosine.class_cap: expected in \(0, 1\]"),
        ("cosine:\n  max_per_class: 0\n", "cosine.max_per_class: expected >= 1"),
        ("cosine:\n  pseudo_threshold: 1.0\n", r"cosine.pseudo_threshold: expected in \[0, 1\)"),
        ("optim:\n  lr: -1\n", "optim.lr: expected > 0, got -1.0"),
        ("optim:\n  momentum: 1.0\n", r"optim.momentum: expected in \[0, 1\), got 1.0"),
        ("optim:\n  momentum: -0.01\n", r"optim.momentum: expected in \[0, 1\), got -0.01"),
        ("model:\n  name: deeplabv2_resnet1O1\n", r"model.name: expected one of \('deeplabv2_resnet18'"),
        ("seed: 100000000000000\n", r"seed: expected in \[0, 4294967295\]"),
        ("optim:\n  lr: fast\n", "optim.lr: expected float, got str 'fast'"),
        ("optim:\n  lr: .inf\n", "optim.lr: expected > 0, got inf"),
        ("cosine:\n  weight: .inf\n", "cosine.weight: expected >= 0, got inf"),
        ("data:\n  synthetic:\n    size: [8, 8]\n", r"data.synthetic.size: expected \[width, height\], both >= 16"),
        ("cosine:\n  class_cap: none\n", r"cosine.class_cap: expected float, got str 'none' \(or null: no cap\)"),
        ("train: {iterations: 2\n", r"config.yaml: not valid YAML \(line 2, column 1\): expected ',' or '}'"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, text, match):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_values_at_the_inner_edges_of_ranges_are_accepted():
    # momentum in [0, 1): 0 is plain SGD, 1 would never forget a gradient.
    assert load_config(None, ["optim.momentum=0"]).optim.momentum == 0.0
    assert load_config(None, ["optim.momentum=0.999"]).optim.momentum == 0.999
    assert load_config(None, ["data.protocols=[13, 16, 19]"]).data.protocols == [13, 16, 19]


def test_overrides_of_string_keys_are_taken_as_written():
    # YAML would read these as a number, a date, and a path cut at its " #".
    for value in ("123", "2024-05-01", "runs/a #2", " runs/b "):
        assert load_config(None, [f"output_dir={value}"]).output_dir == value.strip()
    assert load_config(None, ["model.pretrained='a b.pth'"]).model.pretrained == "a b.pth"  # quoted: YAML
    for null in ("null", "~", ""):  # an optional path's null stays null
        assert load_config(None, [f"model.pretrained={null}"]).model.pretrained is None
    with pytest.raises(ConfigError, match=r"override cosine.weight=\[1: the value is not valid YAML"):
        load_config(None, ["cosine.weight=[1"])


def test_synthetic_data_is_generated_only_when_a_config_asks():
    assert not load_config(None).data.synthetic.enabled  # a config of one's own data need not mention it
    assert load_config(configs.resolve("synthetic")).data.synthetic.enabled


def test_configs_from_checkpoints_are_checked_too():
    with pytest.raises(ConfigError, match="train.eval_every: expected >= 1"):
        config_from_dict({"train": {"eval_every": 0}})
    assert config_from_dict({"cosine": {"max_per_class": None, "class_cap": None}}).cosine.class_cap is None


def test_learning_rates_in_scientific_notation_and_freeze_bn_auto():
    # YAML 1.1 reads 1e-4 (no dot) as a string: it is still the float users mean.
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_config(None, []).model.freeze_bn is None  # auto: frozen exactly with pretrained weights
    assert load_config(None, ["model.freeze_bn=false"]).model.freeze_bn is False


def test_settings_of_how_a_run_runs_are_not_named_as_config_changes():
    # Switched on resume (e.g. the memory levers after running out of memory), they do not change
    # what the run computes, so the resume warning must not list them; a loss setting must be listed.
    before = to_dict(load_config(None))
    for change in ("train.ce_bands=4", "model.activation_checkpointing=true", "cosine.backend=torch",
                   "data.num_workers=2", "data.deep_scan=true", "train.threads=2", "train.log_every=5",
                   "train.eval_every=5", "train.checkpoint_every=5", "train.check_values_every=5", "output_dir=elsewhere"):
        assert config_changes(before, to_dict(load_config(None, [change]))) == [], change
    assert config_changes(before, to_dict(load_config(None, ["train.ce_bands=4", "cosine.weight=0.5"]))) == [
        "cosine.weight: 0.1 -> 0.5"
    ]


@pytest.mark.parametrize(
    "saved, current, refused",
    [
        ([], ["model.pretrained=r.pth"], True),  # null followed pretrained: unfrozen, then frozen
        (["model.pretrained=r.pth"], [], True),
        (["model.pretrained=r.pth"], ["model.pretrained=other.pth"], False),
        ([], ["model.freeze_bn=false"], False),  # null without weights is unfrozen
        (["model.pretrained=r.pth"], ["model.pretrained=r.pth", "model.freeze_bn=true"], False),
        (["model.pretrained=r.pth"], ["model.pretrained=r.pth", "model.freeze_bn=false"], True),
        ([], ["model.freeze_bn=true"], True),
    ],
)
def test_resume_follows_pretrained_where_freeze_bn_is_null(saved, current, refused):
    # Frozen BatchNorm leaves its parameters out of the optimizer's groups: a resume that
    # changes it is refused, whether the change is explicit or through model.pretrained.
    old, new = to_dict(load_config(None, saved)), to_dict(load_config(None, current))
    if refused:
        with pytest.raises(ConfigError, match=r"cannot resume from last\.pt: .*model\.freeze_bn"):
            check_resumable(old, new, "last.pt")
    else:
        check_resumable(old, new, "last.pt")


def test_a_base_config_under_the_file_and_overrides(tmp_path):
    path = tmp_path / "more.yaml"
    path.write_text("cosine:\n  weight: 0.3\n")
    base = {"cosine": {"weight": 0.2, "mode": "all"}, "seed": 5}
    config = load_config(path, ["seed=6"], base=base)
    assert (config.cosine.weight, config.cosine.mode, config.seed) == (0.3, "all", 6)


def test_cuda_rng_states_of_more_gpus_than_this_machine_has(monkeypatch):
    # A checkpoint from an 8-GPU node resumed on 1 GPU: only the GPUs that exist take a state.
    state = checkpoint.rng_state() | {"cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    checkpoint.set_rng_state(state)
    assert restored == [0]


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


def test_a_folder_named_like_a_shipped_config_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic").mkdir()  # e.g. data/synthetic, with the command run from data/
    assert configs.resolve("synthetic") == configs.FOLDER / "synthetic.yaml"


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


def test_label_helpers_refuse_arguments_of_another_scale_or_shape():
    logits = torch.zeros(1, 3, 2, 5)
    with pytest.raises(ValueError, match=r"confidence must be a softmax probability in \[0, 1\), got 80"):
        pseudo_labels(logits, 80, 0.3)  # a percent
    with pytest.raises(ValueError, match=r"class_cap must be a share of the kept pixels in \(0, 1\], or None"):
        pseudo_labels(logits, 0.8, 30)
    with pytest.raises(ValueError, match=r"logits must be B x K x h x w"):
        pseudo_labels(logits[0], 0.8, 0.3)
    with pytest.raises(ValueError, match=r"labels must be B x H x W, got shape \(2, 1, 8, 8\): pass labels.squeeze\(1\)"):
        downsample_labels(torch.zeros(2, 1, 8, 8, dtype=torch.long), (4, 4))
    assert downsample_labels(torch.zeros(2, 8, 8, dtype=torch.long), (4, 4)).shape == (2, 4, 4)


def test_entropy_is_normalized():
    assert entropy_loss(torch.zeros(2, 19, 3, 3)).item() == pytest.approx(1.0)
    assert entropy_loss(torch.tensor([[[[50.0]], [[0.0]]]])).item() == pytest.approx(0.0, abs=1e-6)


def test_cached_dataset_stops_caching_at_its_budget():
    samples = [(torch.full((10,), float(i)), torch.zeros(5, dtype=torch.int64), f"s{i}") for i in range(6)]
    per_sample = 10 * 4 + 5 * 8
    cached = CachedDataset(samples, max_bytes=3 * per_sample)
    assert [cached[i][0][0].item() for i in range(6)] == [0, 1, 2, 3, 4, 5]
    assert sorted(cached.cache) == [0, 1, 2] and cached.cached_bytes == 3 * per_sample
    assert cached[4][2] == "s4"  # read through, not kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rng_states_restore_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, tmp_path / "last.pt")
    expected = torch.rand(3)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt", map_location="cuda")["rng"])
    assert torch.equal(torch.rand(3), expected)
