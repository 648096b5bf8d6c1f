"""The ``visiontl`` command.

``visiontl fit|validate|test|predict --config recipe.yaml`` go through Lightning's
``LightningCLI`` (recipes are ``class_path`` / ``init_args`` YAML; any field can be overridden on
the command line, e.g. ``--model.init_args.strategy partial``). ``visiontl demo`` runs the
offline demo, ``visiontl export`` writes a verified ONNX model, ``visiontl predict-onnx`` runs
one with ONNX Runtime only and ``visiontl check-data`` checks a dataset before training (Lightning
and torch are imported only by the commands that need them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

__all__ = ["main"]


def _demo(argv: Sequence[str]) -> int:
    from visiontl.cli.demo import main as demo_main

    return demo_main(argv)


def _export(argv: Sequence[str]) -> int:
    from visiontl.core.errors import CommandParser

    parser = CommandParser(prog="visiontl export", description="Export a run to a verified ONNX model.")
    parser.add_argument("source", help="a run directory, a .ckpt checkpoint or a PEFT checkpoint (.peft.safetensors)")
    parser.add_argument("--out", required=True, help="target .onnx file (written only once verified)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--images", nargs="*", help="images to verify on (default: the run's validation images)")
    parser.add_argument("--atol", type=float, default=1e-4, help="absolute part of the logit tolerance")
    parser.add_argument("--rtol", type=float, default=1e-3,
                        help="relative part: logits may differ by atol + rtol * max|logit|")
    parser.add_argument("--prob-atol", type=float, default=1e-4, help="largest allowed probability difference")
    parser.add_argument("--quantize", choices=["int8"], help="also write <out>.int8.onnx if it agrees with float")
    parser.add_argument("--calibration-images", nargs="*", help="training images for int8 calibration")
    parser.add_argument("--min-agreement", type=float, default=0.99, help="int8 top-1 agreement needed")
    parser.add_argument("--int8-exclude", nargs="*", metavar="NODE",
                        help="ONNX nodes int8 keeps float (names as in a report's excluded_nodes)")
    parser.add_argument("--weights", help="base weights of a PEFT checkpoint, when not where it was trained "
                                          "(checked by SHA-256)")
    args = parser.parse_args(argv)
    from visiontl.deploy.export import export_onnx

    report = export_onnx(args.source, args.out, opset=args.opset, images=args.images, atol=args.atol,
                         rtol=args.rtol, prob_atol=args.prob_atol,
                         quantize=args.quantize, calibration_images=args.calibration_images,
                         min_agreement=args.min_agreement, weights=args.weights, int8_exclude=args.int8_exclude)
    print(f"wrote {report['path']} ({report['size_bytes'] / 1e6:.1f} MB, opset {report['opset']}); verified on "
          f"{report['verified_on']}: max |logit diff| {report['max_abs_logit_diff']:.2e} (allowed "
          f"{report['logit_tolerance']:.2e} at logit scale {report['logit_scale']:.3g}), max |prob diff| "
          f"{report['max_prob_diff']:.2e}, top-1 agreement {report['top1_agreement']:.3f}")
    if "max_abs_ood_diff" in report:  # a model that abstains: its out-of-distribution score was checked too
        print(f"abstention: max |ood_score diff| {report['max_abs_ood_diff']:.2e} (allowed "
              f"{report['ood_tolerance']:.2e}), {report['abstain_mismatches']} image(s) abstaining on one side only")
    q8 = report.get("int8")
    if q8:
        for step in q8.get("steps", []):
            print(f"int8 step: {step['step']}: top-1 agreement {step['top1_agreement']:.3f}")
        if q8.get("excluded_nodes"):
            print(f"int8 keeps float: {', '.join(q8['excluded_nodes'])}")
        verdict = f"wrote {q8['path']}" if q8["accepted"] else "REFUSED (float model kept as the artefact)"
        print(f"int8 ({q8['method']}): {verdict}; top-1 agreement {q8['top1_agreement']:.3f} on "
              f"{q8['validated_on']} images (needs {q8['min_agreement']}); size {q8['float_bytes'] / 1e6:.1f} -> "
              f"{q8['int8_bytes'] / 1e6:.1f} MB; batch-1 latency {q8['float_latency_ms_bs1']:.1f} -> "
              f"{q8['int8_latency_ms_bs1']:.1f} ms; batch-32 throughput x{q8['int8_vs_float_throughput_bs32']:.2f} "
              f"float's")
        if "abstain_agreement" in q8:
            print(f"int8 abstains where the float model does on {q8['abstain_agreement']:.1%} of the images")
    return 0


def _csv_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say how a CSV source is read (check-data and prepare-data read it alike)."""
    parser.add_argument("--path-column", default="path", help="CSV column with image paths")
    parser.add_argument("--label-column", default="label", help="CSV column with class names")
    parser.add_argument("--suffix", default="", help="appended to every CSV path value (e.g. .jpg for an id column)")
    parser.add_argument("--image-dirs", nargs="*", default=[],
                        help="folders (relative to --root) searched in order for each CSV image")
    parser.add_argument("--root", help="folder CSV paths resolve against (default: the CSV's folder)")
    parser.add_argument("--task", choices=("auto", "multiclass", "multilabel"), default="auto",
                        help="one class per image, or several tags (auto: multi-label when --tag-columns is given "
                             "or a label cell holds --tag-sep)")
    parser.add_argument("--tag-columns", nargs="+", help="multi-label CSV with one 0/1/-1 column per tag: their names")
    parser.add_argument("--tag-sep", default="|", help="multi-label CSV in one column: the separator of the tags")
    parser.add_argument("--uncertain", choices=("ignore", "positive", "negative"), default="ignore",
                        help="what -1 in a tag column means (ignore: left out of loss and metrics)")
    parser.add_argument("--no-tag", help="multi-label CSV in one column: the value of an image with no tag "
                                         "(e.g. 'No Finding'; an empty cell always is)")


def _check_data(argv: Sequence[str]) -> int:
    from visiontl.core.errors import CommandParser

    parser = CommandParser(
        prog="visiontl check-data",
        description="Check a dataset before training: unreadable files, mixed modes, tiny images, class "
                    "imbalance, exact / near duplicates and train/val/test leakage. Exit code 0: no errors, "
                    "1: errors found, 2: not a dataset.",
    )
    parser.add_argument("path", help="class-per-folder tree, folder with train/ val/ test/, or a CSV file")
    _csv_arguments(parser)
    parser.add_argument("--min-size", type=int, default=32, help="report images with a side below this (px)")
    parser.add_argument("--max-imbalance", type=float, default=10.0, help="largest / smallest train class allowed")
    parser.add_argument("--near-threshold", type=int, default=4, help="dHash bits (of 64) for a near duplicate")
    parser.add_argument("--json", help="report file (default: PATH/check-data.json, or <csv>.check-data.json)")
    parser.add_argument("--fast", action="store_true", help="headers only: no decoding, no duplicate search")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-pixels", type=int,
                        help="report images with more pixels as unreadable (default: Pillow's limit, ~179 Mpx)")
    parser.add_argument("--frames", choices=("error", "middle", "all"), default="error",
                        help="multi-frame DICOMs: report them (error, the datamodules' default) or check their "
                             "middle frame (middle, all)")
    args = parser.parse_args(argv)
    from visiontl.core.files import write_json
    from visiontl.data.check import check_data, default_report_path

    report = check_data(args.path, path_column=args.path_column, label_column=args.label_column,
                        min_size=args.min_size, max_imbalance=args.max_imbalance,
                        near_threshold=args.near_threshold, deep=not args.fast, progress=not args.no_progress,
                        max_pixels=args.max_pixels, frames=args.frames, suffix=args.suffix,
                        image_dirs=args.image_dirs, root=args.root, task=args.task, tag_columns=args.tag_columns,
                        tag_sep=args.tag_sep, uncertain=args.uncertain, no_tag=args.no_tag)
    print(report.summary())
    out = args.json or default_report_path(args.path)
    try:
        write_json(out, report.to_dict())
    except OSError as err:
        print(f"error: cannot write the report to {out}: {err}; choose another file with --json.", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 1 if report.errors else 0


def _prepare_data(argv: Sequence[str]) -> int:
    from visiontl.core.errors import CommandParser

    parser = CommandParser(
        prog="visiontl prepare-data",
        description="Write a labelled folder or CSV in LitData's streaming format (one data set per split and "
                    "OUT/visiontl.json), to train from with StreamingDataModule: data on object storage or a shared "
                    "filesystem, larger than memory or local disk. Needs: pip install 'visiontl[stream]'.",
    )
    parser.add_argument("src", help="class-per-folder tree, folder with train/ val/ test/, or a CSV of path,label")
    parser.add_argument("out", help="a local folder, or s3:// / gs:// (LitData uploads the shards)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of each class held out for validation when SRC has no validation split")
    parser.add_argument("--seed", type=int, default=0, help="seed of that validation split")
    parser.add_argument("--image-size", type=int,
                        help="store images resized once for this training size (shorter side 1.15 x); default: as is")
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                        help="stop at an unreadable image (error) or leave it out and list it (skip)")
    parser.add_argument("--frames", choices=("error", "middle", "all"), default="error",
                        help="multi-frame DICOMs: refuse (error), middle frame, or every frame")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of a shard")
    parser.add_argument("--workers", type=int, help="decoding processes (default: the cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
    _csv_arguments(parser)
    args = parser.parse_args(argv)
    from visiontl.data.layout import source_kind
    from visiontl.data.streaming import describe, prepare_data
    from visiontl.core.errors import UserError

    csv = {"path_column": args.path_column, "label_column": args.label_column, "suffix": args.suffix,
           "image_dirs": args.image_dirs or None, "root": args.root, "task": args.task,
           "tag_columns": args.tag_columns, "tag_sep": args.tag_sep, "uncertain": args.uncertain,
           "no_tag": args.no_tag} if source_kind(args.src) == "csv" else None
    try:
        meta = prepare_data(args.src, args.out, val_fraction=args.val_fraction, seed=args.seed,
                            image_size=args.image_size, on_bad_image=args.on_bad_image, frames=args.frames,
                            chunk_bytes=args.chunk_bytes, num_workers=args.workers, overwrite=args.overwrite,
                            csv_options=csv)
    except ImportError as err:  # the stream extra is not installed: the message says what to install
        raise UserError(str(err)) from err
    print(describe(meta))
    print(f"prepared: {args.out} (train with --data visiontl.data.StreamingDataModule "
          f"--data.init_args.input_dir {args.out})")
    return 0


def _wise_ft(argv: Sequence[str]) -> int:
    """``visiontl wise-ft RUN --out DIR [--alphas 0,0.1,...,1] [--retain PATH] [--bn ...]``."""
    from visiontl.core.errors import CommandParser

    parser = CommandParser(prog="visiontl wise-ft",
                           description="WiSE-FT: mix a run's pretrained and fine-tuned weights, score each mix, keep one.")
    parser.add_argument("run", help="a run directory (its checkpoints/best.ckpt) or a checkpoint in one")
    parser.add_argument("--out", required=True, help="folder for wise_ft.csv/.json/.png and wise-ft.ckpt")
    parser.add_argument("--alphas", help="mixing weights to score, comma-separated (0: pretrained + linear head, "
                                         "1: fine-tuned; default 0,0.1,...,1)")
    parser.add_argument("--retain", help="a labelled folder or CSV of a task to keep: scored at every alpha")
    parser.add_argument("--bn", choices=["interpolate", "recompute"], default="interpolate",
                        help="BatchNorm running statistics: interpolated, or re-estimated on the training images")
    parser.add_argument("--weights", help="the pretrained weights, when the ones the run recorded are not here")
    parser.add_argument("--alpha", type=float, help="write this alpha instead of the chosen one")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="choose the smallest alpha within this of the best validation accuracy")
    args = parser.parse_args(argv)
    from visiontl.train.wiseft import DEFAULT_ALPHAS, parse_alphas, wise_ft

    wise_ft(args.run, args.out, parse_alphas(args.alphas) if args.alphas is not None else DEFAULT_ALPHAS,
            retain=args.retain, bn=args.bn, weights=args.weights, alpha=args.alpha, tolerance=args.tolerance)
    return 0


def _lr_find(argv: Sequence[str]) -> int:
    """``visiontl lr-find --config RECIPE [--section.field value ...] [--steps N] [--min-lr X] [--max-lr Y]``."""
    from visiontl.core.errors import CommandParser

    parser = CommandParser(prog="visiontl lr-find", add_help=False,
                           description="Find a learning rate for a recipe's task and data (Lightning's finder): "
                                       "a plot and a suggestion for the strategy's lr. Takes fit's configuration "
                                       "options (--config, --model..., --data..., --trainer...).")
    parser.add_argument("--steps", type=int, default=100, help="steps of the sweep (default: 100)")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="lowest learning rate tried (default: 1e-6)")
    parser.add_argument("--max-lr", type=float, default=1.0, help="highest learning rate tried (default: 1)")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and fit's options")
    args, rest = parser.parse_known_args(list(argv))
    if args.help:
        parser.print_help()
        print("\nConfiguration options: as `visiontl fit --help` lists them.")
        return 0
    from visiontl.train.lrfinder import find_lr

    task, dm, out, name = build_from_config(rest)
    found = find_lr(task, dm, out=out, name=f"{name}-lr-find", steps=args.steps, min_lr=args.min_lr,
                    max_lr=args.max_lr, verbose=True)
    if found.suggestion is None:
        print(f"lr-find: the loss never fell over {args.min_lr:g} to {args.max_lr:g}; widen the range or add steps. "
              f"Plot: {found.plot}")
        return 1
    print(f"suggested learning rate: {found.suggestion:.3g} (the strategy's lr, e.g. --model.init_args.strategy "
          f"'{{name: {task.strategy.name}, lr: {found.suggestion:.3g}}}')")
    print(f"plot: {found.plot}  record: {found.record}")
    return 0


def _recipes(argv: Sequence[str]) -> int:
    from visiontl.core.recipes import find_recipe, recipes, recipes_dir
    from visiontl.core.errors import CommandParser

    parser = CommandParser(
        prog="visiontl recipes",
        description="The recipes bundled with visiontl. `visiontl recipes` lists them; `visiontl recipes show NAME` "
                    "prints one (redirect it to a file to edit it). Use one with --config recipe:NAME.")
    parser.add_argument("action", nargs="?", choices=("list", "show", "path"), default="list")
    parser.add_argument("name", nargs="?", help="a recipe name, e.g. satellite/eurosat-rgb")
    args = parser.parse_args(argv)
    if args.action == "list":
        found = recipes()
        width = max(len(r.name) for r in found)
        for recipe in found:
            print(f"{recipe.name:<{width}}  {recipe.description}")
        print(f"\n{len(found)} recipes in {recipes_dir()}.\nShow one: visiontl recipes show NAME    Run one: "
              f"visiontl fit --config recipe:NAME [--data.init_args.root ...]")
        return 0
    if not args.name:
        parser.error(f"`visiontl recipes {args.action}` needs a recipe NAME (see `visiontl recipes`).")
    recipe = find_recipe(args.name)
    print(recipe.path if args.action == "path" else recipe.path.read_text(encoding="utf-8"), end="\n" if
          args.action == "path" else "")
    return 0


def _elsewhere(spec: str) -> Callable[[Sequence[str]], int]:
    """A command whose code lives in another module (``module:function``), imported when it runs."""
    module, _, name = spec.partition(":")

    def run(argv: Sequence[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(list(argv))

    return run


LIGHTNING_COMMANDS = {
    "fit": "train a recipe: visiontl fit --config recipe:NAME (or your YAML) [--section.field value ...]",
    "validate": "score a checkpoint on the validation split (--ckpt_path)",
    "test": "score a checkpoint on the test split (--ckpt_path)",
    "predict": "predict images with a checkpoint (--ckpt_path), writing predictions.csv",
}

EXTRA_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "demo": (_demo, "offline demo: Blue Marble tiles, real ImageNet weights, strategies compared"),
    "export": (_export, "export a run to ONNX (normalisation + labels inside, verified against PyTorch)"),
    "predict-onnx": (_elsewhere("visiontl.deploy.predict:main"),
                     "predict images with an exported model (ONNX Runtime only, no torch)"),
    "check-data": (_check_data, "check a dataset: unreadable files, imbalance, duplicates, train/val/test leakage"),
    "prepare-data": (_prepare_data, "write a dataset in LitData's streaming format, for StreamingDataModule"),
    "bench": (_elsewhere("visiontl.benchmark.cli:bench_main"),
              "benchmark strategies x backbones x label budgets x seeds on your data, with a report"),
    "rank": (_elsewhere("visiontl.benchmark.cli:rank_main"),
             "rank backbones for your data before fine-tuning (LogME, shrinkage H-score)"),
    "lr-find": (_lr_find,
                "find a learning rate for a recipe (Lightning's finder): a plot and a suggestion"),
    "distill": (_elsewhere("visiontl.train.distill:main"),
                "train a small student to match a fine-tuned teacher run (knowledge distillation)"),
    "wise-ft": (_wise_ft, "mix a run's pretrained and fine-tuned weights (WiSE-FT): score each alpha, keep one"),
    "recipes": (_recipes, "list the bundled recipes, or show one: visiontl recipes [show NAME]"),
    "doctor": (_elsewhere("visiontl.cli.doctor:main"),
               "print versions, CPU features, GPUs, the cache and offline weights, for a bug report"),
}


COMMAND_MODULES = {
    "fit": "visiontl.cli.commands", "validate": "visiontl.cli.commands", "test": "visiontl.cli.commands",
    "predict": "visiontl.cli.commands", "demo": "visiontl.cli.demo", "export": "visiontl.deploy.export",
    "predict-onnx": "visiontl.deploy.predict", "check-data": "visiontl.data.check",
    "prepare-data": "visiontl.data.streaming", "bench": "visiontl.benchmark.cli", "rank": "visiontl.benchmark.rank",
    "distill": "visiontl.train.distill", "lr-find": "visiontl.train.lrfinder", "wise-ft": "visiontl.train.wiseft",
    "recipes": "visiontl.core.recipes", "doctor": "visiontl.cli.doctor",
}
"""Where each command's work is done (the Lightning subcommands: the ``VisionTLCLI`` here, which
trains through :mod:`visiontl.train`); ``docs/concepts/architecture.md`` lists the same."""

_LIGHT_COMMANDS = ("predict-onnx", "recipes", "doctor")  # torch-free or light: Lightning is not imported for them


def overview() -> str:
    """``visiontl --help``: every command with one line, as git and pip list theirs."""
    from visiontl import __version__

    width = max(map(len, [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]))
    lines = [f"visiontl {__version__}: transfer learning on images (timm backbones, PyTorch Lightning).", "",
             "usage: visiontl COMMAND [options]     (visiontl COMMAND --help for a command's options)", "",
             "Train and evaluate (LightningCLI: a recipe YAML, any field overridable on the command line):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    groups = {"Data": ("check-data", "prepare-data"), "Compare and choose": ("demo", "bench", "rank", "lr-find"),
              "After training": ("export", "predict-onnx", "distill", "wise-ft"), "Help": ("recipes", "doctor")}
    for title, names in groups.items():
        lines += ["", f"{title}:"] + [f"  {name:<{width}}  {EXTRA_COMMANDS[name][1]}" for name in names]
    lines += ["", "  --version  print the version", "",
              "Start: visiontl demo (offline); then visiontl fit --config recipe:folder "
              "--data.init_args.root path/to/images"]
    return "\n".join(lines)


def _with_recipes(args: list[str]) -> list[str]:
    """``--config recipe:NAME`` (or ``--config=recipe:NAME``) -> the bundled recipe's path."""
    from visiontl.core.recipes import PREFIX, resolve_config

    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out) and out[i + 1].startswith(PREFIX):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config=" + PREFIX):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def _cli_class():
    from argparse import ArgumentError

    from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

    from visiontl.train.resume import ResumeError as ResumeErrorType

    class VisionTLCLI(LightningCLI):
        """LightningCLI that links the datamodule's classes into the task."""

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            """A key or option the command does not take: one line with the closest one."""
            from visiontl.cli.config import (
                ConfigError,
                command_keys,
                explain_parse_error,
            )

            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                subcommand = next((a for a in (args or []) if a in LIGHTNING_COMMANDS), None)
                raise ConfigError(explain_parse_error(err, command_keys(subcommand),
                                                      f"visiontl {subcommand or 'fit'}")) from err

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
            parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
            parser.link_arguments("data.task", "model.init_args.task", apply_on="instantiate")

        def _parse_ckpt_path(self) -> None:
            """A checkpoint is data, never configuration.

            Lightning's ``LightningCLI._parse_ckpt_path`` merges a ``--ckpt_path`` checkpoint's
            ``hyper_parameters`` into the parsed configuration: the class paths they name are
            imported, and their values override the user's (``weights: /etc/passwd``). Here the
            checkpoint is only read, through visiontl's one reader (weights only, one-line errors),
            and compared with the configuration once the classes exist
            (:func:`visiontl.cli.checkpoint.check_matches`). ``tests/hostile/test_hostile_cli.py`` names
            this internal and fails when Lightning stops calling it.
            """
            from visiontl.cli.checkpoint import read_cli_checkpoint

            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            self._visiontl_ckpt = read_cli_checkpoint(ckpt_path)

        def before_instantiate_classes(self) -> None:
            """Unset precision: the device's mixed precision on a GPU (``visiontl.core.devices``); a
            checkpoint being evaluated brings its own weights (no pretrained weights are loaded)."""
            from visiontl.cli.checkpoint import check_config, no_pretrained_weights
            from visiontl.core.devices import resolve_precision

            config = self.config[self.subcommand] if self.subcommand else self.config
            trainer = config.get("trainer")
            if trainer is not None:
                trainer.precision = resolve_precision(trainer.get("precision"), trainer.get("accelerator", "auto"))
            ckpt = getattr(self, "_visiontl_ckpt", None)
            if ckpt is not None:
                check_config(ckpt, config)
                if self.subcommand in ("validate", "test", "predict"):
                    no_pretrained_weights(config)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            """The Trainer of the configuration, with the run's callbacks, as every door gives them
            (:func:`visiontl.train.run.attach_run_callbacks`)."""
            from visiontl.train.run import attach_run_callbacks

            return attach_run_callbacks(super().instantiate_trainer(**kwargs))

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            ckpt = getattr(self, "_visiontl_ckpt", None)
            if ckpt is not None:
                from visiontl.cli.checkpoint import check_model

                check_model(ckpt, self.model)

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
            """``--ckpt_path last`` resumes the newest version of this run name, in that directory."""
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if subcommand == "fit" and str(kwargs.get("ckpt_path")) == "last":
                from visiontl.train.resume import resolve_last

                logger = self.trainer.logger
                root = getattr(logger, "root_dir", None)
                if root is None:
                    raise ResumeErrorType("--ckpt_path last needs the run's logger (visiontl.train.resume.RunLogger) to "
                                          "know where the run lives; give the checkpoint's path instead.")
                kwargs["ckpt_path"], version = resolve_last(root)
                logger._version = version  # continue in that directory, not a new version_N
                from visiontl.cli.checkpoint import check_model, read_cli_checkpoint

                self._visiontl_ckpt = read_cli_checkpoint(kwargs["ckpt_path"])
                check_model(self._visiontl_ckpt, self.model)
            if kwargs.get("ckpt_path") is not None:
                from visiontl.tasks.checkpoints import weights_only_kwargs

                kwargs.update(weights_only_kwargs(getattr(self.trainer, subcommand)))
            return kwargs

        def _run_subcommand(self, subcommand: str) -> None:
            from visiontl.train.run import discard_if_empty

            try:
                super()._run_subcommand(subcommand)
            except BaseException:
                discard_if_empty(self.trainer)  # stopped on bad input: no empty version_N left behind
                raise

    return VisionTLCLI


def cli(argv: Sequence[str] | None = None, run: bool = True):
    """Run the Lightning subcommands (fit, validate, test, predict); ``run=False``: parse a fit
    configuration (no subcommand) and build its task, datamodule and Trainer without running."""
    from pytorch_lightning import LightningDataModule

    from visiontl.tasks import BaseTask

    extra = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in EXTRA_COMMANDS.items())
    return _cli_class()(
        BaseTask,
        LightningDataModule,  # labelled, source + target, or unlabelled (continued pretraining)
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(argv) if argv is not None else None,
        run=run,
        trainer_defaults={
            "logger": {"class_path": "visiontl.train.resume.RunLogger", "init_args": {"save_dir": "runs"}},
            "num_sanity_val_steps": 0,  # as fine_tune: every door resolves a run the same way (settings.json)
        },
        # a bad option or configuration key raises (one line, ``visiontl.cli.config``) instead of a usage dump
        parser_kwargs={"description": f"visiontl: transfer learning on images.\n\nMore commands:\n{extra}",
                       "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
    )


def build_from_config(argv: Sequence[str]) -> tuple[Any, Any, str, str]:
    """The task and datamodule a fit configuration (``--config recipe:NAME``, ``--model...``) describes,
    built as ``visiontl fit`` builds them but not trained, with where the run would write
    (the logger's ``save_dir`` and ``name``): for commands that probe a configuration (``lr-find``)."""
    built = cli(argv, run=False)
    logger = built.trainer.logger
    return built.model, built.datamodule, str(getattr(logger, "save_dir", None) or "runs"), str(
        getattr(logger, "name", None) or "run")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``visiontl`` console script.

    A failure ends with one line on stderr (what failed, the file, field or value, what to do) and
    a non-zero exit: 2 for bad input (:class:`~visiontl.core.errors.UserError`, a file that could not be
    written), 1 for anything unexpected. ``--debug`` or ``VISIONTL_DEBUG=1`` shows the traceback.
    """
    from visiontl.core.errors import debug_enabled

    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(args)
    args = [a for a in args if a != "--debug"]
    try:
        return _dispatch(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (files are written atomically: nothing half-written is left at its final name).",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`visiontl --help | head`): nothing to report, as git does
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 141
    except Exception as err:  # noqa: BLE001 - the one place every failure becomes one line
        if debug:
            raise
        code, text = failure_message(err)
        print(text, file=sys.stderr)
        return code


def failure_message(err: BaseException) -> tuple[int, str]:
    """The exit code and the one line (two for an unexpected error) a failure prints."""
    from visiontl.core.errors import UserError, describe_os_error, known_cause, one_line

    cause = known_cause(err)
    if isinstance(cause, UserError):
        return 2, f"error: {one_line(cause)}"
    if isinstance(cause, OSError):  # a destination that is full, read-only or not ours
        where = f" {cause.filename}" if getattr(cause, "filename", None) else ""
        return 2, f"error: could not write{where}: {describe_os_error(cause)}; free space or choose another folder."
    return 1, (f"error: {type(err).__name__}: {one_line(err, 300)}\n"
               f"This is not a known input problem: run again with --debug for the traceback and report it "
               f"with the output of `visiontl doctor`.")


def _dispatch(args: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not args or args[0] in ("-h", "--help", "help"):
        print(overview())
        return 0
    if args[0] in ("--version", "-V"):
        from visiontl import __version__

        print(f"visiontl {__version__}")
        return 0
    args = _with_recipes(args)
    if not args[0].startswith("-") and args[0] not in (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS):
        import difflib

        close = difflib.get_close_matches(args[0], [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS], n=1)
        hint = f" Did you mean `visiontl {close[0]}`?" if close else ""
        print(f"error: unknown command {args[0]!r}.{hint} `visiontl --help` lists the commands.", file=sys.stderr)
        return 2
    if args[0] in _LIGHT_COMMANDS or (args[0] in EXTRA_COMMANDS and {"-h", "--help"} & set(args[1:])):
        return EXTRA_COMMANDS[args[0]][0](args[1:])  # help needs neither Lightning nor its quieting
    from visiontl.core.quiet import quiet

    with quiet(verbose=True):  # Lightning's tips, dependencies' deprecations: never; data warnings: always
        if args[0] in EXTRA_COMMANDS:
            return EXTRA_COMMANDS[args[0]][0](args[1:])
        cli(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
