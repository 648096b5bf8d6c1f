"""The ``visiontl`` command.

``visiontl fit|validate|test|predict --config recipe.yaml`` go through Lightning's
``LightningCLI`` (recipes are ``class_path`` / ``init_args`` YAML; any field can be overridden on
the command line, e.g. ``--model.init_args.strategy partial``). ``visiontl demo`` runs the
offline demo.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

__all__ = ["VisionTLCLI", "main"]


def _demo(argv: Sequence[str]) -> int:
    from visiontl.demo import main as demo_main

    return demo_main(argv)


EXTRA_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "demo": (_demo, "offline demo: Blue Marble tiles, real ImageNet weights, strategies compared"),
}


class VisionTLCLI(LightningCLI):
    """LightningCLI that links the datamodule's classes into the task."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")


def cli(argv: Sequence[str] | None = None) -> VisionTLCLI:
    """Run the Lightning subcommands (fit, validate, test, predict)."""
    from visiontl.data import ClassificationDataModule
    from visiontl.tasks import BaseTask

    extra = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in EXTRA_COMMANDS.items())
    return VisionTLCLI(
        BaseTask,
        ClassificationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(argv) if argv is not None else None,
        trainer_defaults={
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            "log_every_n_steps": 5,
        },
        parser_kwargs={"description": f"visiontl: transfer learning on images.\n\nMore commands:\n{extra}"},
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``visiontl`` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[args[0]][0](args[1:])
    cli(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
