"""Hostile model files for ``visiontl predict-onnx`` (issue 31, sections 4 and 5): the ONNX file's
metadata is someone else's data, and the CSVs visiontl writes must be safe to open in a spreadsheet.

The models are built here with ``onnx.helper`` (global average pool, one linear layer, softmax:
the export's ``input`` / ``logits`` / ``probabilities`` names and metadata keys), so every case is
a fraction of a second and needs no torch; the exported-model path is ``tests/deploy/test_export.py``'s.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from helpers.hostile import assert_one_line_failure, run_cli, run_cli_subprocess
from visiontl.core.files import csv_dict_rows, csv_dict_writer, csv_safe, csv_unescape, csv_writer

EVIL = "=cmd|/C calc!A0"
EXPORT_INTERPOLATION = "area (shrink) / bilinear (enlarge)"


def tiny_model(path: Path, names: list[str] | None = None, *, classes: int | None = None, size: tuple = (32, 32),
               channels: int = 3, graph_size: tuple | None = None, graph_classes: Any = "same",
               meta: dict[str, Any] | None = None, drop: tuple[str, ...] = (), bias: list[float] | None = None,
               preprocessing: dict[str, Any] | None = None) -> Path:
    """An ONNX model shaped like an export: ``input`` (N, C, H, W) -> mean over H, W -> linear ->
    ``logits`` and ``probabilities``, with visiontl's metadata.

    ``graph_size``: static (H, W) of the graph's input (default dynamic); ``graph_classes``:
    ``"same"`` (K scores from a K-wide linear layer) or ``"channels"`` (no linear layer: one score
    per input channel, so neither the input's channels nor the output's width is fixed in the
    graph); ``meta`` overrides metadata values, ``drop`` removes keys, ``preprocessing`` updates
    the preprocessing record.
    """
    names = list(names or ["a", "b", "c"])
    k = classes or len(names)
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(channels, k)).astype(np.float32)
    b = np.asarray(bias if bias is not None else np.zeros(k), dtype=np.float32)
    h, w = graph_size or ("height", "width")
    linear = graph_classes == "same"
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1)]
    nodes += ([helper.make_node("MatMul", ["flat", "weight"], ["scores"]),
               helper.make_node("Add", ["scores", "bias"], ["logits"])] if linear
              else [helper.make_node("Identity", ["flat"], ["logits"])])
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    width = k if linear else "classes"
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels if linear else "chans", h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(b, "bias")] if linear else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    record = {"in_chans": channels, "size": size[0], "mean": [0.5] * channels, "std": [0.25] * channels,
              "crop_pct": 1.0, "interpolation": "bilinear", "bit_depth": 8, "normalization": "backbone",
              **(preprocessing or {})}
    props = {"class_names": json.dumps(names), "input_size": json.dumps(list(size)), "channels": str(channels),
             "crop_pct": "1.0", "interpolation": EXPORT_INTERPOLATION, "preprocessing": json.dumps(record),
             **(meta or {})}
    helper.set_model_props(model, {key: value for key, value in props.items() if key not in drop})
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small RGB images (one named like a formula) in a folder."""
    folder = tmp_path_factory.mktemp("hostile_images")
    rng = np.random.default_rng(1)
    for name in ("one.png", "two.png", "-3+cmd.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / name)
    return folder


def predict(model: Path, images: Path, tmp_path: Path, *extra: str):
    out = tmp_path / "predictions.csv"
    return run_cli("predict-onnx", model, images, "--out", out, *extra), out


# -- section 4: the metadata is validated against the graph and bounded -----------------------------

def test_a_huge_input_size_is_refused_before_anything_is_allocated(images: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import visiontl.deploy.predict

    def no_image_may_be_read(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an image was read for a model whose input_size is refused")

    monkeypatch.setattr(visiontl.deploy.predict, "preprocess", no_image_may_be_read)
    model = tiny_model(tmp_path / "huge.onnx", size=(100000, 100000), preprocessing={"size": 100000})
    result, out = predict(model, images, tmp_path)
    message = assert_one_line_failure(result, "huge.onnx", "input_size", "[100000, 100000]", rc=2)
    assert "pixel limit" in message and not out.exists()
    # the limit is the image pixel limit: a user who means it can raise it (the graph is dynamic)
    small = tiny_model(tmp_path / "wide.onnx", size=(64, 4096), preprocessing={"size": 4096})
    assert_one_line_failure(predict(small, images, tmp_path, "--max-pixels", "100000")[0], "input_size", rc=2)


@pytest.mark.parametrize("field,value,changes", [
    ("bit_depth", "1000", {"preprocessing": {"bit_depth": 1000}}),
    ("bit_depth", "'8'", {"preprocessing": {"bit_depth": "8"}}),
    ("interpolation", "evil", {"preprocessing": {"interpolation": "evil"}}),
    ("interpolation", "evil", {"meta": {"interpolation": "evil"}}),
    ("std", "nan", {"preprocessing": {"std": [float("nan")] * 3}}),
    ("preprocessing", "must be a JSON object", {"meta": {"preprocessing": "[1, 2]"}}),
    ("class_names", "non-empty JSON list", {"meta": {"class_names": '"abc"'}}),
    ("class_names", "non-empty JSON list", {"meta": {"class_names": "[]"}}),
    ("class_names", "more than once", {"names": ["a", "a", "b"]}),
    ("input_size", "[32.5, 32]", {"meta": {"input_size": "[32.5, 32]"}}),
    ("input_size", "[32, 32, 32]", {"meta": {"input_size": "[32, 32, 32]"}}),
    ("input_size", "[0, 32]", {"meta": {"input_size": "[0, 32]"}}),
    ("channels", "100000", {"meta": {"channels": "100000"}}),
    ("channels", "3x", {"meta": {"channels": "3x"}}),
    ("crop_pct", "inf", {"meta": {"crop_pct": "inf"}}),
    ("preprocessing", "disagrees", {"preprocessing": {"size": 64}}),
    ("ood", "[1]", {"meta": {"ood": "[1]"}}),
    ("ood", "NaN", {"meta": {"ood": '{"score": "knn", "threshold": NaN}'}}),
    ("ood", "ood_score", {"meta": {"ood": '{"score": "knn", "threshold": 0.2}'}}),  # no such output in the graph
])
def test_out_of_bounds_metadata_is_a_one_line_refusal(field: str, value: str, changes: dict[str, Any],
                                                       images: Path, tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "edited.onnx", changes.get("names"), meta=changes.get("meta"),
                       preprocessing=changes.get("preprocessing"))
    result, out = predict(model, images, tmp_path)
    assert_one_line_failure(result, "edited.onnx", field, value, rc=2)
    assert not out.exists()


def test_one_class_name_for_three_scores_is_refused(images: Path, tmp_path: Path) -> None:
    """The issue's case: rc 0 and every row labelled with the one name, before."""
    model = tiny_model(tmp_path / "one_name.onnx", ["only"], classes=3)
    result, out = predict(model, images, tmp_path)
    assert_one_line_failure(result, "one_name.onnx", "3 class scores", "1 classes", "only", rc=2)
    assert not out.exists()


def test_class_count_is_checked_when_the_graph_leaves_it_symbolic(images: Path, tmp_path: Path) -> None:
    """A graph that does not declare its output width is caught on its first batch."""
    model = tiny_model(tmp_path / "symbolic.onnx", ["only"], graph_classes="channels")  # 3 channels: 3 scores
    result, out = predict(model, images, tmp_path)
    assert_one_line_failure(result, "symbolic.onnx", "[3, 3]", "1 classes", rc=2)
    assert not out.exists()


def test_a_static_input_shape_must_agree_with_input_size(images: Path, tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "static.onnx", size=(64, 64), graph_size=(32, 32), preprocessing={"size": 64})
    result, _ = predict(model, images, tmp_path)
    assert_one_line_failure(result, "static.onnx", "32 x 32", "input_size", "[64, 64]", rc=2)
    # agreeing static shapes are fine
    good = tiny_model(tmp_path / "static_ok.onnx", size=(32, 32), graph_size=(32, 32))
    assert predict(good, images, tmp_path)[0].rc == 0


# -- section 6: what is not a visiontl ONNX model ---------------------------------------------------

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_a_training_checkpoint_says_export_it_first(zipped: bool, images: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {}}, ckpt,
               _use_new_zipfile_serialization=zipped)
    result, _ = predict(ckpt, images, tmp_path)
    message = assert_one_line_failure(result, ckpt, "training checkpoint", "visiontl export", rc=2)
    assert "PROTOBUF" not in message
    renamed = tmp_path / "model.onnx"  # told by its bytes, whatever its name
    renamed.write_bytes(ckpt.read_bytes())
    assert_one_line_failure(predict(renamed, images, tmp_path)[0], renamed, "training checkpoint", rc=2)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "folder", "missing", "no-metadata", "text"])
def test_a_file_that_is_not_a_visiontl_model_is_named(kind: str, images: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    if kind == "garbage":
        model.write_bytes(bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)))
    elif kind == "empty":
        model.write_bytes(b"")
    elif kind == "truncated":
        full = tiny_model(tmp_path / "full.onnx").read_bytes()
        model.write_bytes(full[: len(full) // 2])
    elif kind == "folder":
        model.mkdir()
    elif kind == "no-metadata":
        tiny_model(model, drop=("class_names", "input_size", "channels", "preprocessing"))
    elif kind == "text":
        model.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n")
    result, out = predict(model, images, tmp_path)
    assert_one_line_failure(result, model, rc=2)
    assert not out.exists()


def test_the_real_command_prints_one_line_for_garbage(images: Path, tmp_path: Path) -> None:
    """From outside: ONNX Runtime's own logging must not add lines to the refusal."""
    model = tmp_path / "garbage.onnx"
    model.write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0f" + b"not a model" * 50)
    result = run_cli_subprocess("predict-onnx", model, images, timeout=300)
    message = assert_one_line_failure(result, model, rc=2)
    assert message.startswith("error:")


# -- a good model predicts as before ----------------------------------------------------------------

def test_a_good_model_still_predicts_every_image(images: Path, tmp_path: Path) -> None:
    from visiontl.deploy.predict import Predictor, preprocess

    model = tiny_model(tmp_path / "good.onnx", ["cat", "dog", "-1"])
    result, out = predict(model, images, tmp_path)
    assert result.rc == 0 and result.err == "", result.err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    files = sorted(images.iterdir())
    assert [r["path"] for r in rows] == [csv_safe(str(f)) for f in files]
    predictor = Predictor(model)
    weight = numpy_helper.to_array(onnx.load(str(model)).graph.initializer[0])
    for row, file in zip(rows, files):
        logits = preprocess(file, (32, 32), 3).mean(axis=(1, 2)) @ weight
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert row["label"] == predictor.class_names[int(probs.argmax())]
        assert float(row["probability"]) == pytest.approx(float(probs.max()), abs=1e-6)
        assert row["error"] == ""


# -- section 5: CSV cells that are safe to open in a spreadsheet ------------------------------------

def test_a_formula_class_name_is_escaped_in_predictions_csv(images: Path, tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "evil.onnx", [EVIL, "b", "@SUM(1+1)"], bias=[50.0, 0.0, 0.0])
    result, out = predict(model, images, tmp_path)
    assert result.rc == 0, result.err
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["path", "label", "probability", "error"]
    assert {r[1] for r in rows[1:]} == {"'" + EVIL}  # the cell a spreadsheet shows as text
    assert all(r[2].startswith("1.0") or r[2].startswith("0.99") for r in rows[1:])  # numbers stay numbers
    formula_path = next(r[0] for r in rows[1:] if "-3+cmd" in r[0])
    assert not formula_path.startswith("'")  # an absolute path starts with '/'
    assert [csv_unescape(r[1]) for r in rows[1:]] == [EVIL] * 3


def test_a_formula_file_name_given_relative_is_escaped(images: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(images)
    model = tiny_model(tmp_path / "m.onnx")
    out = tmp_path / "p.csv"
    result = run_cli("predict-onnx", "--out", out, "--", model, "-3+cmd.png")  # `--`: argparse takes -3... as a name
    assert result.rc == 0, result.err
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[1][0] == "'-3+cmd.png"


@pytest.mark.parametrize("value,written", [
    ("=1+1", "'=1+1"), ("+cmd", "'+cmd"), ("-cmd", "'-cmd"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"),
    ("\r=x", "'\r=x"), (EVIL, "'" + EVIL), ("'=x", "''=x"), ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"),
    ("--1", "'--1"), ("cat", "cat"), ("", ""), ("'quoted", "'quoted"), ("a=b", "a=b"),
    ("-0.5", "-0.5"), ("+1e-3", "+1e-3"), ("-12", "-12"), (-0.5, -0.5), (3, 3), (None, None), (1.5e-9, 1.5e-9),
    (Path("-x.png"), "'-x.png"),
])
def test_csv_safe_escapes_formula_text_only_and_reverses_exactly(value: Any, written: Any) -> None:
    assert csv_safe(value) == written
    assert csv_unescape(csv_safe(value)) == (str(value) if isinstance(value, Path) else value)
    assert csv_unescape(csv_safe(csv_safe(value))) == csv_safe(value)  # escaping is one-to-one


def test_csv_writers_escape_and_the_reader_reads_back(tmp_path: Path) -> None:
    values = [EVIL, "-1", "-a", "@b", "\tc", "'=d", "plain", -0.25]
    buf = io.StringIO()
    writer = csv_dict_writer(buf, ["=name", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({"=name": v, "value": i - 3} for i, v in enumerate(values))
    text = buf.getvalue()
    assert text.splitlines()[0] == "'=name,value"
    assert all(not line.startswith(("=", "+", "@", "\t", "\r")) for line in text.splitlines())
    assert "-3" in text.splitlines()[1]  # a negative number is written as a number
    back = csv_dict_rows(io.StringIO(text))
    assert [r["=name"] for r in back] == [str(v) for v in values]
    plain = io.StringIO()
    csv_writer(plain).writerows([[v] for v in values])
    assert [row[0] for row in csv.reader(io.StringIO(plain.getvalue()))] == [str(csv_safe(v)) for v in values]


def test_a_runs_splits_csv_reads_back_the_same_labels_and_paths(tmp_path: Path) -> None:
    """``splits.csv`` is written escaped and read by wise-ft / distill through ``read_csv_rows``."""
    from visiontl.data.layout import read_csv_rows

    labels = [EVIL, "-1", "+1", "@home", "'=quoted", "plain"]
    buf = io.StringIO()
    writer = csv_writer(buf)
    writer.writerow(["split", "path", "label"])
    for i, label in enumerate(labels):
        writer.writerow(["train", f"-scan{i}.png", label])  # relative, beginning with '-'
    listing = tmp_path / "splits.csv"
    listing.write_text(buf.getvalue())
    assert "'=cmd" in listing.read_text() and "'-scan0.png" in listing.read_text()
    rows = read_csv_rows(listing)
    assert [r.label for r in rows] == labels
    assert [r.path for r in rows] == [tmp_path / f"-scan{i}.png" for i in range(len(labels))]


def test_a_bench_results_csv_round_trips_formula_names(tmp_path: Path) -> None:
    from visiontl.benchmark.store import BenchStore

    store = BenchStore(tmp_path / "bench")
    assert store.append({"key": "k1", "data": "-data", "backbone": EVIL, "val_acc": 0.5})
    assert "'" + EVIL in store.results.read_text()
    (row,) = store.rows()
    assert (row["data"], row["backbone"], row["val_acc"]) == ("-data", EVIL, "0.5")
    store.add_score({"data": "=d", "backbone": "@b", "logme": -1.25})
    assert store.scores()[0]["data"] == "=d" and store.scores()[0]["logme"] == "-1.25"


def test_the_confusion_matrix_csv_is_escaped(tmp_path: Path) -> None:
    from visiontl.analyse.plots import save_confusion_matrix

    out = save_confusion_matrix(np.array([[2, 1], [0, 3]]), [EVIL, "b"], tmp_path / "cm.png", tmp_path / "cm.csv")
    rows = list(csv.reader(io.StringIO(Path(out["csv"]).read_text())))
    assert rows[0] == ["true\\pred", "'" + EVIL, "b"] and rows[1][0] == "'" + EVIL and rows[1][1:] == ["2", "1"]
