"""Hostile checkpoints and PEFT checkpoints (issue 31, section 6): every bad file given to ``export``,
``wise-ft`` or ``distill`` is one line naming it, exit 2, nothing written, nothing in it run; and
``ClassificationTask.from_checkpoint`` / ``load_delta`` raise a :class:`~visiontl.core.errors.UserError`.
One reader, :mod:`visiontl.tasks.checkpoints`, holds all of it."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from helpers.hostile import assert_one_line_failure, run_cli

from visiontl.tasks.checkpoints import CheckpointError
from visiontl.core.errors import UserError
from visiontl.tasks import ClassificationTask


# --------------------------------------------------------------------------- payloads
class _Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint carries."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _best(run) -> dict:  # noqa: F811
    return torch.load(run.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)


def _edited(run, path: Path, edit) -> Path:  # noqa: F811
    ckpt = _best(run)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def bad_checkpoints(run, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
                    ) -> tuple[dict[str, tuple[Path, str]], Path]:
    """Each hostile ``.ckpt`` with the word its message must contain; and the pickle's sentinel."""
    work = tmp_path_factory.mktemp("bad_ckpt")
    sentinel = work / "SENTINEL"
    pickled = work / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": "test_resnet"}, "x": _Payload(sentinel)}, pickled)
    listed = work / "list.ckpt"
    torch.save([1, 2, 3], listed)
    garbage = work / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 4)
    empty = work / "empty.ckpt"
    empty.write_bytes(b"")
    folder = work / "folder.ckpt"
    folder.mkdir()
    whole = (run.run_dir / "checkpoints" / "best.ckpt").read_bytes()
    truncated = work / "truncated.ckpt"
    truncated.write_bytes(whole[: len(whole) // 2])

    def strategy_string(c):
        c["hyper_parameters"]["strategy"] = "full"

    def passwd(c):
        c["hyper_parameters"]["backbone"] = "../../etc/passwd"

    def typo(c):
        c["hyper_parameters"]["backbone"] = "test_resnte"

    def no_state(c):
        del c["state_dict"]

    def no_hparams(c):
        del c["hyper_parameters"]

    def not_a_tensor(c):
        c["state_dict"]["model.fc.weight"] = "weights"

    def wrong_shape(c):
        c["state_dict"]["model.fc.weight"] = torch.zeros(7, 5)

    def foreign_strategy(c):
        c["hyper_parameters"]["strategy"] = {"class_path": "os.system", "init_args": {"command": f"touch {sentinel}"}}

    def bad_classes(c):
        c["hyper_parameters"]["num_classes"] = "three"

    cases = {
        "pickled": (pickled, "pickled Python objects"),
        "list": (listed, "holds a list"),
        "garbage": (garbage, "not a torch checkpoint"),
        "empty": (empty, "is empty"),
        "truncated": (truncated, "not a torch checkpoint"),
        "folder": (folder, "is a folder"),
        "missing": (work / "missing.ckpt", "does not exist"),
        "strategy_string": (_edited(run, work / "strategy_string.ckpt", strategy_string),
                            "strategy is recorded as a str"),
        "passwd": (_edited(run, work / "passwd.ckpt", passwd), "../../etc/passwd"),
        "typo": (_edited(run, work / "typo.ckpt", typo), "Did you mean: test_resnet"),
        "no_state": (_edited(run, work / "no_state.ckpt", no_state), "no state_dict"),
        "no_hparams": (_edited(run, work / "no_hparams.ckpt", no_hparams), "no hyper_parameters"),
        "not_a_tensor": (_edited(run, work / "not_a_tensor.ckpt", not_a_tensor), "model.fc.weight"),
        "wrong_shape": (_edited(run, work / "wrong_shape.ckpt", wrong_shape), "[7, 5]"),
        "foreign_strategy": (_edited(run, work / "foreign.ckpt", foreign_strategy), "not a registered"),
        "bad_classes": (_edited(run, work / "bad_classes.ckpt", bad_classes), "num_classes"),
    }
    return cases, sentinel


CKPT_CASES = ["pickled", "list", "garbage", "empty", "truncated", "folder", "missing", "strategy_string", "passwd",
              "typo", "no_state", "no_hparams", "not_a_tensor", "wrong_shape", "foreign_strategy", "bad_classes"]


# --------------------------------------------------------------------------- checkpoints
def test_from_checkpoint_refuses_each_bad_checkpoint_with_a_user_error(bad_checkpoints) -> None:
    cases, sentinel = bad_checkpoints
    for name in CKPT_CASES:
        path, words = cases[name]
        with pytest.raises(CheckpointError) as err:
            ClassificationTask.from_checkpoint(path)
        message = str(err.value)
        assert isinstance(err.value, UserError) and "\n" not in message, (name, message)
        assert path.name in message and words in message, (name, message)
    assert not sentinel.exists()


def test_the_pickled_payload_is_named_and_never_run(bad_checkpoints, tmp_path: Path) -> None:
    cases, sentinel = bad_checkpoints
    path, _ = cases["pickled"]
    result = run_cli("export", path, "--out", tmp_path / "m.onnx")
    message = assert_one_line_failure(result, path.name, "pickled Python objects", rc=2)
    assert "asks for posix.system" in message or "asks for os.system" in message or "asks for nt.system" in message
    assert "Trying to load unsupported" not in result.err and not (tmp_path / "m.onnx").exists()
    assert not sentinel.exists()


@pytest.mark.parametrize("name", CKPT_CASES)
def test_export_of_a_bad_checkpoint_is_one_line_and_writes_nothing(bad_checkpoints, name: str, tmp_path: Path) -> None:
    cases, sentinel = bad_checkpoints
    path, words = cases[name]
    if name == "folder":  # export takes a folder as a run directory
        words = "no checkpoints/best.ckpt"
    out = tmp_path / "m.onnx"
    result = run_cli("export", path, "--out", out)
    assert_one_line_failure(result, path.name, words, rc=2)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["pickled", "list", "garbage", "strategy_string", "passwd", "wrong_shape"])
def test_wise_ft_of_a_bad_checkpoint_is_one_line_and_writes_nothing(bad_checkpoints, name: str,
                                                                    tmp_path: Path) -> None:
    cases, sentinel = bad_checkpoints
    path, words = cases[name]
    result = run_cli("wise-ft", path, "--out", tmp_path / "wf")
    assert_one_line_failure(result, path.name, words, rc=2)
    assert not (tmp_path / "wf").exists() and not sentinel.exists()


@pytest.mark.parametrize("name", ["pickled", "list", "garbage", "strategy_string", "passwd"])
def test_distill_of_a_bad_teacher_is_one_line_and_writes_nothing(bad_checkpoints, name: str, tmp_path: Path) -> None:
    cases, sentinel = bad_checkpoints
    path, words = cases[name]
    result = run_cli("distill", path, "--student", "test_resnet", "--no-pretrained", "--out", tmp_path / "runs")
    assert_one_line_failure(result, path.name, words, rc=2)
    assert not (tmp_path / "runs").exists() and not sentinel.exists()


@pytest.mark.parametrize("name", ["garbage", "pickled", "list", "empty", "folder"])
def test_distill_ckpt_path_of_a_bad_file_is_one_line(run, bad_checkpoints, name: str,  # noqa: F811
                                                     tmp_path: Path) -> None:
    cases, sentinel = bad_checkpoints
    path, words = cases[name]
    result = run_cli("distill", run.run_dir, "--student", "test_resnet", "--no-pretrained", "--out", tmp_path / "runs",
                     "--ckpt-path", path)
    assert_one_line_failure(result, path.name, words, "--ckpt-path", rc=2)
    assert not (tmp_path / "runs").exists() and not sentinel.exists()


def test_distill_ckpt_path_of_another_backbone_is_named(run, tmp_path: Path) -> None:  # noqa: F811
    best = run.run_dir / "checkpoints" / "best.ckpt"
    result = run_cli("distill", run.run_dir, "--student", "test_efficientnet", "--no-pretrained", "--out",
                     tmp_path / "runs", "--ckpt-path", best)
    assert_one_line_failure(result, "best.ckpt", "test_resnet", "test_efficientnet", rc=2)


def test_wise_ft_alphas_name_the_bad_values(run, tmp_path: Path) -> None:  # noqa: F811
    from visiontl.train.wiseft import WiseFTError, parse_alphas

    result = run_cli("wise-ft", run.run_dir, "--out", tmp_path / "wf", "--alphas", "0,abc,2")
    assert_one_line_failure(result, "'abc' is not a number", "2 is outside [0, 1]", rc=2)
    assert not (tmp_path / "wf").exists()
    for text in ("nan", "inf", ",", "-0.5"):
        with pytest.raises(WiseFTError, match=r"alphas must be numbers in \[0, 1\]"):
            parse_alphas(text)
    assert parse_alphas("1, 0,0.5,0.5") == [0.0, 0.5, 1.0]
    result = run_cli("wise-ft", run.run_dir, "--out", tmp_path / "wf", "--alpha", "1.5")
    assert_one_line_failure(result, "1.5 is outside [0, 1]", rc=2)


def test_a_good_checkpoint_still_loads_and_its_record_is_read(run) -> None:  # noqa: F811
    from visiontl.tasks.checkpoints import read_checkpoint
    from visiontl.tasks.checkpoints import checkpoint_record

    best = run.run_dir / "checkpoints" / "best.ckpt"
    task = ClassificationTask.from_checkpoint(best)
    assert task.hparams["backbone"] == "test_resnet" and task.strategy.name == "full"
    assert set(read_checkpoint(best)) >= {"state_dict", "hyper_parameters"}
    assert "val_acc" in checkpoint_record(best)["val_metrics"]


def test_checkpoint_record_reads_as_data(bad_checkpoints, tmp_path: Path) -> None:
    from visiontl.tasks.checkpoints import checkpoint_record

    cases, sentinel = bad_checkpoints
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        checkpoint_record(cases["pickled"][0])
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        checkpoint_record(cases["garbage"][0])
    assert checkpoint_record(cases["missing"][0]) is None and not sentinel.exists()


# --------------------------------------------------------------------------- PEFT checkpoints
def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture(scope="module")
def delta(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ClassificationTask]:
    """A LoRA PEFT checkpoint of test_resnet on a local base-weights file (no training)."""
    pytest.importorskip("peft")
    from helpers.training import weights_file as _weights_file

    from visiontl.tasks.delta import save_delta

    work = tmp_path_factory.mktemp("bad_delta")
    weights = _weights_file(work / "base.safetensors")
    task = ClassificationTask("test_resnet", num_classes=3, class_names=["a", "b", "c"], weights=str(weights),
                              strategy={"name": "lora", "r": 4}, preprocessing={"size": 32})
    return save_delta(task, work / "good.peft.safetensors"), task


@pytest.fixture(scope="module")
def bad_deltas(delta, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    from safetensors.torch import load_file, save_file

    good, _ = delta
    work = tmp_path_factory.mktemp("bad_deltas")
    raw = good.read_bytes()
    header, data = _header(good)
    meta = header["__metadata__"]
    tensors = load_file(str(good))
    lora_b = next(n for n in tensors if ".lora_B." in n)
    lora_a = lora_b.replace(".lora_B.", ".lora_A.")
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, words: str, path: Path) -> None:
        cases[name] = (path, words)

    truncated = work / "truncated.peft.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    case("truncated", "truncated", truncated)
    tiny = work / "tiny.peft.safetensors"
    tiny.write_bytes(raw[:5])
    case("tiny", "truncated", tiny)
    huge = work / "huge_header.peft.safetensors"
    huge.write_bytes(struct.pack("<Q", 2 ** 62) + raw[8:200])
    case("huge_header", "header", huge)
    not_json = work / "not_json.peft.safetensors"
    not_json.write_bytes(struct.pack("<Q", 40) + b"{not json at all" + b" " * 24 + data)
    case("header_not_json", "not JSON", not_json)

    impossible = json.loads(json.dumps(header))
    impossible[lora_b]["shape"] = [2 ** 40, 2 ** 40]
    case("impossible_shape", lora_b, _write(work / "impossible.peft.safetensors", impossible, data))
    negative = json.loads(json.dumps(header))
    negative[lora_b]["shape"] = [-1, 4]
    case("negative_shape", "impossible shape", _write(work / "negative.peft.safetensors", negative, data))
    outside = json.loads(json.dumps(header))
    outside[lora_b]["data_offsets"] = [0, 10 ** 12]
    case("offsets_outside", "data_offsets", _write(work / "outside.peft.safetensors", outside, data))
    dtype = json.loads(json.dumps(header))
    dtype[lora_b]["dtype"] = "Q7"
    case("unknown_dtype", "Q7", _write(work / "dtype.peft.safetensors", dtype, data))

    wrong = dict(tensors)
    wrong["fc.weight"] = torch.zeros(5, tensors["fc.weight"].shape[1])
    save_file(wrong, str(work / "wrong_shape.peft.safetensors"), metadata=meta)
    case("wrong_shape", "[5, ", work / "wrong_shape.peft.safetensors")
    save_file(tensors, str(work / "meta_not_json.peft.safetensors"),
              metadata={**meta, "hyper_parameters": "{backbone:"})
    case("metadata_not_json", "hyper_parameters is not JSON", work / "meta_not_json.peft.safetensors")
    save_file(tensors, str(work / "extra_not_json.peft.safetensors"), metadata={**meta, "extra": "[1, 2"})
    case("extra_not_json", "extra is not JSON", work / "extra_not_json.peft.safetensors")
    no_hp = {k: v for k, v in meta.items() if k != "hyper_parameters"}
    save_file(tensors, str(work / "no_hparams.peft.safetensors"), metadata=no_hp)
    case("no_hyper_parameters", "no hyper_parameters", work / "no_hparams.peft.safetensors")
    hp = json.loads(meta["hyper_parameters"])
    save_file(tensors, str(work / "passwd.peft.safetensors"),
              metadata={**meta, "hyper_parameters": json.dumps({**hp, "backbone": "../../etc/passwd"})})
    case("backbone_path", "../../etc/passwd", work / "passwd.peft.safetensors")
    save_file(tensors, str(work / "strategy_string.peft.safetensors"),
              metadata={**meta, "hyper_parameters": json.dumps({**hp, "strategy": "lora"})})
    case("strategy_string", "strategy is recorded as a str", work / "strategy_string.peft.safetensors")

    nan = dict(tensors)
    nan[lora_b] = torch.full_like(tensors[lora_b], float("nan"))
    save_file(nan, str(work / "nan.peft.safetensors"), metadata=meta)
    case("nan_tensor", "NaN", work / "nan.peft.safetensors")
    overflow = dict(tensors)  # finite factors whose product is not: the merge overflows to inf
    overflow[lora_a] = torch.full_like(tensors[lora_a], 1e30)
    overflow[lora_b] = torch.full_like(tensors[lora_b], 1e30)
    save_file(overflow, str(work / "overflow.peft.safetensors"), metadata=meta)
    case("merge_not_finite", "merges to NaN or infinite", work / "overflow.peft.safetensors")

    corrupt = work / "corrupt.peft.safetensors"  # a delta by name, pickle-like bytes inside
    corrupt.write_bytes(b"\x80\x02" + bytes(range(256)) * 2)
    case("corrupt_by_name", "PEFT checkpoint", corrupt)
    return cases


DELTA_CASES = ["truncated", "tiny", "huge_header", "header_not_json", "impossible_shape", "negative_shape",
               "offsets_outside", "unknown_dtype", "wrong_shape", "metadata_not_json", "extra_not_json",
               "no_hyper_parameters", "backbone_path", "strategy_string", "nan_tensor", "merge_not_finite",
               "corrupt_by_name"]


def test_load_delta_refuses_each_bad_peft_checkpoint_with_a_user_error(bad_deltas) -> None:
    from visiontl.tasks.trained import load_delta

    for name in DELTA_CASES:
        path, words = bad_deltas[name]
        with pytest.raises(UserError) as err:
            load_delta(path)
        message = str(err.value)
        assert "\n" not in message and path.name in message and words in message, (name, message)
        assert "torch checkpoint" not in message and "pickle" not in message, (name, message)


@pytest.mark.parametrize("name", DELTA_CASES)
def test_export_of_a_bad_peft_checkpoint_is_one_line_and_writes_nothing(bad_deltas, name: str,
                                                                        tmp_path: Path) -> None:
    path, words = bad_deltas[name]
    out = tmp_path / "m.onnx"
    result = run_cli("export", path, "--out", out)
    message = assert_one_line_failure(result, path.name, words, rc=2)
    assert "torch checkpoint" not in message and "pickle" not in message  # never read as a .ckpt
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_wrong_tensor_shape_names_both_shapes(bad_deltas, delta) -> None:
    from visiontl.models.weights import WeightsMismatchError
    from visiontl.tasks.trained import load_delta

    _, task = delta
    width = task.model.state_dict()["fc.weight"].shape[1]
    with pytest.raises(WeightsMismatchError, match=rf"fc\.weight has shape \[5, {width}\].*\[3, {width}\]"):
        load_delta(bad_deltas["wrong_shape"][0])


def test_distill_of_a_bad_peft_teacher_is_one_line(bad_deltas, tmp_path: Path) -> None:
    for name in ("truncated", "corrupt_by_name", "metadata_not_json"):
        path, words = bad_deltas[name]
        result = run_cli("distill", path, "--student", "test_resnet", "--no-pretrained", "--out", tmp_path / "runs")
        assert_one_line_failure(result, path.name, words, rc=2)
    assert not (tmp_path / "runs").exists()


def test_a_peft_checkpoint_under_another_name_is_read_as_one(delta, tmp_path: Path) -> None:
    """Content decides too: a good delta renamed .ckpt still loads as a delta; a .ckpt command that
    takes only full checkpoints says what the file is."""
    from visiontl.tasks.trained import load_task

    good, task = delta
    renamed = tmp_path / "delta.ckpt"
    renamed.write_bytes(good.read_bytes())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_task(renamed)(x), task.eval()(x))
    with pytest.raises(CheckpointError, match="is a safetensors file"):
        ClassificationTask.from_checkpoint(renamed)
