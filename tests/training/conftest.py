"""A tiny synthetic data set and config shared by the trainer tests (seconds, not minutes)."""

import pytest

from cossim_fast.data import generate_synthetic_uda
from cossim_fast.training import load_config


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_uda(root, seed=0, num_source=12, num_source_val=2, num_target_train=12, num_target_val=3, size=(48, 32))
    return root


def tiny_overrides(data_root, output_dir, *extra):
    return [
        f"output_dir={output_dir}",
        "data.synthetic.enabled=false",
        f"data.source.root={data_root}/gta5",
        f"data.target.root={data_root}/cityscapes",
        f"data.val.root={data_root}/cityscapes",
        "data.source.size=[48, 32]",
        "data.target.size=[48, 32]",
        "data.val.size=[48, 32]",
        "train.iterations=6",
        "train.batch_size_source=2",
        "train.batch_size_target=2",
        "train.log_every=2",
        "train.eval_every=3",
        "train.checkpoint_every=2",
        "train.threads=1",
        "cosine.slots_per_class=16",
        "cosine.threshold=0.0",
        "cosine.pseudo_threshold=0.0",
        *extra,
    ]


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    def make(*extra, output="run"):
        return load_config(None, tiny_overrides(tiny_data, tmp_path / output, *extra))

    return make
