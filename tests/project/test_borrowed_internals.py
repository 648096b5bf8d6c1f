"""What visiontl borrows from Lightning and LitData beyond their public API, on the record.

Each test names one private internal visiontl relies on and fails with a message saying which,
and where visiontl uses it, when a new release moves it. pyproject.toml bounds both packages to the
tested range; docs/reference/development.md lists the same internals.
"""

from __future__ import annotations

import inspect

import pytest


def _moved(internal: str, used_in: str, why: str) -> str:
    return (f"{internal} moved in this release: {used_in} relies on it ({why}). Adapt {used_in}, then widen "
            f"the bound in pyproject.toml and the list in docs/reference/development.md.")


def test_lightning_cli_private_hooks() -> None:
    """LightningCLI: ``_parse_ckpt_path`` (replaced: a checkpoint never becomes configuration),
    ``_prepare_subcommand_kwargs`` (``--ckpt_path last``, ``weights_only``) and ``_run_subcommand``
    (no empty ``version_N`` after a failed set-up)."""
    from pytorch_lightning.cli import LightningCLI

    from visiontl.cli.commands import _cli_class

    init = inspect.getsource(LightningCLI.__init__)
    assert "self._parse_ckpt_path()" in init, _moved("LightningCLI._parse_ckpt_path", "visiontl/cli/commands.py",
                                                     "a --ckpt_path checkpoint must not be merged into the config")
    assert callable(getattr(LightningCLI, "_prepare_subcommand_kwargs", None)), _moved(
        "LightningCLI._prepare_subcommand_kwargs", "visiontl/cli/commands.py", "--ckpt_path last resolves the newest run")
    assert "self._prepare_subcommand_kwargs(" in inspect.getsource(LightningCLI._run_subcommand), _moved(
        "LightningCLI._run_subcommand", "visiontl/cli/commands.py", "a failed set-up discards its empty run directory")
    ours = vars(_cli_class())
    assert {"_parse_ckpt_path", "_prepare_subcommand_kwargs", "_run_subcommand"} <= set(ours)


def test_csv_logger_version_and_writer() -> None:
    """``CSVLogger._version`` (a resumed run continues its ``version_N``) and the experiment writer's
    ``_check_log_dir_exists`` / ``_rewrite_with_new_header`` (a resumed ``metrics.csv`` is kept)."""
    from lightning_fabric.loggers.csv_logs import _ExperimentWriter
    from pytorch_lightning.loggers import CSVLogger

    assert "self._version" in inspect.getsource(CSVLogger.version.fget) or "_version" in inspect.getsource(
        CSVLogger.__init__), _moved("CSVLogger._version", "visiontl/cli/commands.py", "resume into the same version_N")
    init = inspect.getsource(_ExperimentWriter.__init__)
    assert "self._check_log_dir_exists()" in init, _moved(
        "_ExperimentWriter._check_log_dir_exists", "visiontl/train/resume.py", "Lightning's deletes metrics.csv there")
    assert "self._rewrite_with_new_header(" in inspect.getsource(_ExperimentWriter), _moved(
        "_ExperimentWriter._rewrite_with_new_header", "visiontl/train/resume.py", "the rewrite must be atomic")


def test_the_loop_state_last_ckpt_relies_on() -> None:
    """``LastCheckpoint`` writes at a batch's start and records one logging step less, because
    ``_TrainingEpochLoop.reset`` adds one on such a resume (checkpoint key
    ``loops/fit_loop/epoch_loop.state_dict/_batches_that_stepped``); the datamodules skip a resumed
    epoch's trained batches from ``fit_loop.epoch_loop.batch_progress.current.processed``."""
    from pytorch_lightning.loops.progress import _BatchProgress
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    assert "self._batches_that_stepped += 1" in inspect.getsource(_TrainingEpochLoop.reset), _moved(
        "_TrainingEpochLoop.reset's logging-step increment", "visiontl/train/resume.py", "resumed rows would shift")
    assert '"_batches_that_stepped"' in inspect.getsource(_TrainingEpochLoop.on_save_checkpoint), _moved(
        "the epoch loop's _batches_that_stepped state", "visiontl/train/resume.py", "resumed rows would shift")
    progress = _BatchProgress()
    assert hasattr(progress.current, "processed") and hasattr(progress.current, "completed"), _moved(
        "batch_progress.current.processed / completed", "visiontl/data/base.py, visiontl/train/resume.py",
        "a resumed epoch skips trained batches; a loader's state is taken as of the batches trained")
    assert hasattr(progress, "is_last_batch"), _moved("batch_progress.is_last_batch", "visiontl/train/resume.py",
                                                      "last.ckpt at an epoch's end with a stateful loader")
    from pytorch_lightning.loops.fit_loop import _FitLoop

    assert 'state_dict["combined_loader"]' in inspect.getsource(_FitLoop.on_save_checkpoint), _moved(
        "the fit loop's combined_loader checkpoint state", "visiontl/train/resume.py",
        "a streamed run resumes with the first batch it had not trained")


def test_strategy_layer_sync() -> None:
    """``Strategy._layer_sync`` tells that ``Trainer(sync_batchnorm=True)`` was asked for (refused on
    the CPU with one line, before DDP refuses it with a bare error)."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(sync_batchnorm=True, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)  # built, never launched
    assert getattr(trainer.strategy, "_layer_sync", None) is not None, _moved(
        "Strategy._layer_sync", "visiontl/tasks/base.py", "sync_batchnorm on the CPU is refused in one line")


def test_litdata_internals() -> None:
    """LitData: ``StreamingDataLoader.restore`` (a resumed epoch is served once) and
    ``fs_provider._get_fs_provider`` (its own uploader for ``visiontl.json`` next to the shards)."""
    litdata = pytest.importorskip("litdata")
    from litdata.streaming import fs_provider

    assert callable(getattr(fs_provider, "_get_fs_provider", None)), _moved(
        "litdata.streaming.fs_provider._get_fs_provider", "visiontl/data/streaming.py", "uploads visiontl.json")
    source = inspect.getsource(litdata.StreamingDataLoader)
    assert "self.restore" in source, _moved("StreamingDataLoader.restore", "visiontl/data/streamset.py",
                                            "a resumed epoch's rest would be served twice")
