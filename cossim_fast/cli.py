"""The ``cossim-fast`` command line: generate-data, train, evaluate, demo, op-demo."""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable

#: How torch re-raises an error of a DataLoader worker (or its pin-memory thread): the worker's
#: whole formatted traceback as the message of a new error of the same class.
_WORKER_HEADER = re.compile(r"Caught \w+ in [^\n]+\.\nOriginal Traceback \(most recent call last\):\n")


def error_message(error: BaseException) -> str:
    """``str(error)``, but for an error re-raised from a DataLoader worker only the original
    error's message (the end of the worker's traceback, without the class name), not three
    tracebacks (the library's cause, the library's error, the loader's frames)."""
    text = str(error)
    if not _WORKER_HEADER.match(text):
        return text
    kind = type(error)  # the worker's error class: torch re-raises with the same one
    name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
    # The last "module.Class: " line starts the message (which may run over several lines);
    # earlier ones belong to the chained causes.
    _, found, message = text.rpartition(f"\n{name}: ")
    if found:
        return message.strip()
    last = text.strip().splitlines()[-1]  # a format we do not know: at least no traceback
    return last.split(": ", 1)[-1]


def _config(args: argparse.Namespace):
    from cossim_fast import configs
    from cossim_fast.training import load_config

    return load_config(configs.resolve(args.config), args.set)


def _add_config_options(parser: argparse.ArgumentParser, default: str | None = "synthetic") -> None:
    shipped = "a YAML file, or a shipped config by name (synthetic, gta2cs_deeplabv2, syn2cs_deeplabv2)"
    if default:
        text = f"{shipped}; default: {default} (the embedded synthetic benchmark and its tuned recipe)"
    else:
        text = f"{shipped}, applied on top of the checkpoint's own config"
    parser.add_argument("--config", default=default, help=text)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. cosine.weight=0.05")


def generate_data(args: argparse.Namespace) -> int:
    paths = _config(args).data.synthetic.generate()
    for name, path in paths.items():
        print(f"{name:<11} {path}")
    return 0


def train(args: argparse.Namespace) -> int:
    from cossim_fast.training import Trainer, distributed

    resume = None if args.resume == "none" else args.resume
    trainer = Trainer(_config(args), resume=resume)
    result = trainer.train()
    distributed.shutdown(trainer.context)
    scores = ", ".join(f"{k} {100 * v:.2f}" for k, v in result.items() if k.startswith("mIoU") or k == "aAcc")
    print(f"run folder: {trainer.run_dir} (checkpoints/, metrics, plots){'; last evaluation: ' + scores if scores else ''}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    from cossim_fast import configs
    from cossim_fast.data import NUM_CLASSES
    from cossim_fast.models import build_model
    from cossim_fast.training import checkpoint, evaluate as run_evaluation, load_config
    from cossim_fast.training.distributed import resolve_device
    from cossim_fast.training.trainer import make_dataset

    state = checkpoint.load(args.checkpoint)
    # The checkpoint's own config, then --config and --set on top (a val set elsewhere, say).
    saved = json.loads(state["config"])
    config = load_config(configs.resolve(args.config) if args.config else None, args.set, base=saved)
    checkpoint.check_model_name(state, config.model.name, args.checkpoint, "model.name")
    device = resolve_device(config.train.device)
    model = build_model(
        config.model.name, NUM_CLASSES, feature_point=config.model.feature_point, random_init_notice=False
    ).to(device)
    model.load_state_dict(state["model"])
    matrix = run_evaluation(model, make_dataset(config.data.val, "data.val", labels=True, full_resolution_labels=True), device, progress=True)
    print(matrix.table(config.data.protocols, title=f"{args.checkpoint} (iteration {state['iteration']})"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cossim-fast", description="UDA semantic segmentation with the cosine-similarity loss")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("demo", help="synthetic data, source-only vs cosine loss, a results table and plots", add_help=False)
    commands.add_parser("op-demo", help="the operator alone: loss + backward on every backend, times and peak memory", add_help=False)
    command = commands.add_parser("generate-data", help="write the synthetic GTA5/Cityscapes-layout data set")
    _add_config_options(command)
    command.set_defaults(run=generate_data)
    command = commands.add_parser("train", help="train (resumes from OUTPUT_DIR/checkpoints/last.pt if present)")
    _add_config_options(command)
    command.add_argument("--resume", default="auto", help="auto (default), none, or a checkpoint path")
    command.set_defaults(run=train)
    command = commands.add_parser(
        "evaluate", help="mIoU of a checkpoint on the target val split (its config, with --config and --set on top)"
    )
    command.add_argument("checkpoint", help="a checkpoint of cossim-fast train (OUTPUT_DIR/checkpoints/best.pt or last.pt)")
    _add_config_options(command, default=None)
    command.set_defaults(run=evaluate)

    argv = list(sys.argv[1:] if argv is None else argv)
    run: Callable[[], int]
    if argv and argv[0] in ("demo", "op-demo"):  # these parse their own options
        if argv[0] == "demo":
            from cossim_fast.training import demo as module
        else:
            from cossim_fast import op_demo as module
        name, run = argv[0], functools.partial(module.main, argv[1:])
    else:
        args = parser.parse_args(argv)
        name, run = args.command, functools.partial(args.run, args)
    from cossim_fast.data import DatasetError
    from cossim_fast.models import WeightsError
    from cossim_fast.training import CheckpointError, ConfigError, TrainingDivergedError, TrainingOutOfMemoryError
    from cossim_fast.training.demo import DemoRunError

    try:
        return run()
    except (ConfigError, DatasetError, CheckpointError, WeightsError, FileNotFoundError) as error:
        # Input mistakes get one clear line, not a traceback.
        print(f"cossim-fast {name}: error: {error_message(error)}", file=sys.stderr)
        return 2
    except (TrainingOutOfMemoryError, TrainingDivergedError, DemoRunError) as error:
        print(f"cossim-fast {name}: error: {error_message(error)}", file=sys.stderr)  # what to change, not a traceback
        return 3


if __name__ == "__main__":
    sys.exit(main())
