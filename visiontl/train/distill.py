"""``visiontl distill``: train a small student to match a fine-tuned teacher run.

>>> from visiontl.train.distill import distill
>>> result = distill("runs/lite0-gradual/version_0", student="mobilenetv3_small_050",
...                  image_size=64, unlabelled="data/unlabelled")  # doctest: +SKIP
>>> result.metrics["val_acc"], result.run_dir  # doctest: +SKIP

By default the student trains on the teacher's own images and split (its run's ``splits.csv``), so
its validation images are ones the teacher never trained on either, with the teacher's augmentation
preset (``data.json``). The loss, the online teacher and each model's own preprocessing are
described in :mod:`visiontl.tasks.distill`. The result is an ordinary run directory: ``visiontl
export`` and ``predict-onnx`` take it like any other; ``metrics.json`` records the teacher, ``T``,
``alpha`` and the teacher's accuracy on the student's input (``val_teacher_acc``) beside its own.
A run directory is data: nothing in it is imported or executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from visiontl.train.finetune import FitResult

__all__ = ["distill", "main"]


def _teacher_run(teacher: str | os.PathLike[str]) -> Path:
    """The run directory of a teacher given as a directory or a checkpoint inside one."""
    path = Path(teacher)
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path


def _teacher_data(teacher: str | os.PathLike[str], data_kwargs: dict[str, Any], task: str = "multiclass") -> Any:
    """The teacher's datamodule: its ``splits.csv`` (the same train / val split, read as the teacher's
    ``task``) and preset."""
    from visiontl.data import CsvDataModule
    from visiontl.data.images import DataError

    run = _teacher_run(teacher)
    listing = run / "splits.csv"
    if not listing.is_file():
        raise DataError(f"The teacher's run {run} has no splits.csv to take its images from; give the student's data "
                        f"(--data FOLDER or CSV).")
    recorded = run / "data.json"
    if "augment" not in data_kwargs and recorded.is_file():
        try:
            augment = json.loads(recorded.read_text()).get("augment")
        except (OSError, ValueError):
            augment = None
        if isinstance(augment, str):
            data_kwargs = {**data_kwargs, "augment": augment}
    return CsvDataModule(str(listing), split_column="split", **{"task": task, **data_kwargs})


def _check_teacher(path: Path) -> str:
    """The teacher's checkpoint or PEFT checkpoint, checked as data (:mod:`visiontl.tasks.checkpoints`;
    memory-mapped, header only) before anything else is read; it is loaded when the task is built.
    Returns the teacher's task (``multiclass`` or ``multilabel``)."""
    from visiontl.tasks.checkpoints import looks_like_safetensors, read_checkpoint, task_spec
    from visiontl.tasks.delta import read_delta

    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        hp = read_delta(path)[2]
    else:
        hp = read_checkpoint(path, mmap=True, what="teacher checkpoint")["hyper_parameters"]
        task_spec(hp, str(path))
    return "multilabel" if isinstance(hp, dict) and hp.get("task") == "multilabel" else "multiclass"


def _check_resume(ckpt_path: str | os.PathLike[str], student: str) -> None:
    """A checkpoint to resume the student from: a readable visiontl checkpoint (as data, nothing
    unpickled) of the same student backbone, checked before Lightning loads it."""
    from visiontl.tasks.checkpoints import CheckpointError, read_checkpoint

    ckpt = read_checkpoint(ckpt_path, mmap=True, what="--ckpt-path")
    recorded = ckpt["hyper_parameters"].get("backbone")
    if recorded != student:
        raise CheckpointError(f"--ckpt-path {ckpt_path} is a checkpoint of backbone {str(recorded)[:80]!r}, not of the "
                              f"student {student!r}; give the student run's checkpoints/last.ckpt, or 'last'.")


def distill(
    teacher: str | os.PathLike[str],
    student: str = "mobilenetv3_small_050",
    *,
    data: Any = None,
    unlabelled: str | os.PathLike[str] | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    strategy: Any = None,
    pretrained: bool = True,
    student_weights: str | None = None,
    teacher_weights: str | None = None,
    image_size: int | None = None,
    steps: int | None = None,
    out: str | os.PathLike[str] = "runs",
    name: str | None = None,
    seed: int = 0,
    data_kwargs: dict[str, Any] | None = None,
    task_kwargs: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    ckpt_path: str | os.PathLike[str] | None = None,
    also_log_to: Sequence[str] = (),
    verbose: bool = False,
) -> FitResult:
    """Distil ``teacher`` (a run directory or checkpoint) into a ``student`` timm backbone.

    ``steps``, ``out``, ``seed``, ``data_kwargs``, ``task_kwargs``, ``trainer_kwargs``, ``ckpt_path``,
    ``also_log_to`` and ``verbose`` are as in :func:`~visiontl.fine_tune` (the same run driver,
    :func:`~visiontl.train.finetune.fit_task`).

    Args:
        teacher: the teacher's run directory, ``.ckpt`` or PEFT checkpoint.
        student: timm model name of the student.
        data: the student's labelled data (folder, CSV or datamodule); default: the teacher run's
            ``splits.csv`` and augmentation preset. Its classes must be the teacher's.
        unlabelled: a folder of unlabelled images: the teacher's soft labels on them join the
            distillation term (the adaptation target folder, or any images of the task).
        temperature: softmax temperature ``T``.
        alpha: weight of the distillation term (``1 - alpha``: the labels' cross-entropy); ``alpha=0``
            trains on labels alone (the baseline ``benchmarks/distill.py`` compares with).
        strategy: the student's strategy; default ``gradual`` (LP-FT, as :func:`~visiontl.fine_tune`) for a
            student from pretrained weights, ``scratch`` for one from random weights (``gradual``
            would hold its random BatchNorm statistics frozen).
        pretrained: start the student from timm's pretrained weights.
        student_weights: a local weights file or named source for the student (offline).
        teacher_weights: base weights of a PEFT teacher, when not where it was trained.
        image_size: the student's input size (default: its backbone's); the teacher keeps its own.
        name: run name (default ``<student>-distilled``).

    Returns:
        A :class:`~visiontl.train.finetune.FitResult` for the student.
    """
    import pytorch_lightning as pl

    from visiontl.train.finetune import fit_task, make_datamodule
    from visiontl.data.images import DataError
    from visiontl.data.protocols import LabelledSplits, TaggedData
    from visiontl.tasks.trained import run_checkpoint
    from visiontl.tasks.distill import DistillationTask

    kind = _check_teacher(run_checkpoint(teacher))  # a clear error for a wrong teacher before any data is read
    if ckpt_path is not None and str(ckpt_path) != "last":
        _check_resume(ckpt_path, student)
    pl.seed_everything(seed, workers=True, verbose=False)
    kwargs = {"seed": seed, **(data_kwargs or {})}
    if unlabelled is not None:
        kwargs["unlabelled"] = str(unlabelled)
    dm = make_datamodule(data, **kwargs) if data is not None else _teacher_data(teacher, kwargs, kind)
    if unlabelled is not None and not (isinstance(dm, LabelledSplits) and dm.unlabelled):  # a datamodule given as such
        if not isinstance(dm, LabelledSplits):
            raise DataError(f"{type(dm).__name__} cannot pair unlabelled images with its batches; give data as a "
                            f"folder or CSV, or a visiontl ClassificationDataModule.")
        dm.unlabelled = str(unlabelled)
    if image_size is not None:
        dm.image_size = image_size
    if strategy is None:
        strategy = "gradual" if pretrained or student_weights else "scratch"
    task = DistillationTask(backbone=student, num_classes=dm.num_classes, class_names=dm.class_names,
                            task="multilabel" if isinstance(dm, TaggedData) and dm.multilabel else "multiclass",
                            strategy=strategy, pretrained=pretrained, weights=student_weights, teacher=str(teacher),
                            temperature=temperature, alpha=alpha, teacher_weights=teacher_weights,
                            **(task_kwargs or {}))
    return fit_task(task, dm, steps=steps, out=out, name=name or f"{student}-distilled", ckpt_path=ckpt_path,
                    trainer_kwargs=trainer_kwargs, also_log_to=also_log_to, verbose=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """``visiontl distill TEACHER_RUN --student BACKBONE --out DIR ...``"""
    from visiontl.core.errors import CommandParser

    parser = CommandParser(
        prog="visiontl distill",
        description="Train a small student to match a fine-tuned teacher (Hinton et al. 2015: KL on temperature-"
                    "softened logits, T^2-scaled, plus cross-entropy on the labels). The teacher runs online on "
                    "the student's augmented crop, each with its own preprocessing. The student's run directory "
                    "exports and predicts like any other.")
    parser.add_argument("teacher", help="the teacher's run directory (or its .ckpt / PEFT checkpoint)")
    parser.add_argument("--student", required=True, help="timm backbone of the student (e.g. mobilenetv3_small_050)")
    parser.add_argument("--out", default="runs", help="parent folder of the student's run directory")
    parser.add_argument("--name", help="run name (default <student>-distilled)")
    parser.add_argument("--data", help="the student's labelled data, a class-per-folder tree or CSV (default: the "
                                       "teacher run's splits.csv: the same images and split)")
    parser.add_argument("--unlabelled", help="a folder of unlabelled images for the distillation term")
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T (default 4)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the distillation term; 1 - alpha weighs the labels (default 0.5)")
    parser.add_argument("--strategy", help="the student's strategy (default: gradual from pretrained weights, "
                                           "scratch with --no-pretrained)")
    parser.add_argument("--student-weights", help="local weights file or named source for the student (offline)")
    parser.add_argument("--no-pretrained", action="store_true", help="start the student from random weights")
    parser.add_argument("--teacher-weights", help="base weights of a PEFT teacher, when not where it was trained")
    parser.add_argument("--image-size", type=int, help="the student's input size (default: its backbone's)")
    parser.add_argument("--augment", help="augmentation preset (default: the teacher run's)")
    parser.add_argument("--steps", type=int, help="optimisation steps (default: from the dataset size)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: from the dataset size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-path", help="resume: 'last' (this run's latest checkpoint, after a kill) or a .ckpt")
    args = parser.parse_args(argv)

    data_kwargs = {k: v for k, v in (("augment", args.augment), ("batch_size", args.batch_size)) if v is not None}
    result = distill(args.teacher, args.student, data=args.data, unlabelled=args.unlabelled,
                     temperature=args.temperature, alpha=args.alpha, strategy=args.strategy,
                     pretrained=not args.no_pretrained, student_weights=args.student_weights,
                     teacher_weights=args.teacher_weights, image_size=args.image_size, steps=args.steps,
                     out=args.out, name=args.name, seed=args.seed, data_kwargs=data_kwargs,
                     ckpt_path=args.ckpt_path, verbose=True)  # a command shows Lightning's lines; bad input: a UserError, one line (visiontl.cli.commands.main)
    m = result.metrics
    print(f"student {args.student}: val_acc {m.get('val_acc', float('nan')):.3f}, agreement with the teacher "
          f"{m.get('val_teacher_agreement', float('nan')):.3f} (teacher on the student's input: val_acc "
          f"{m.get('val_teacher_acc', float('nan')):.3f})")
    print(f"run: {result.run_dir}  (export: visiontl export {result.run_dir} --out student.onnx)")
    return 0
