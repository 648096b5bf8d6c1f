"""The first hour of a new user: ``visiontl --help`` / ``--version``, bundled recipes (``visiontl
recipes``, ``--config recipe:NAME``, and in a wheel), ``visiontl doctor``, and quiet output."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import venv
import warnings
import zipfile
from pathlib import Path

import pytest
import yaml

from visiontl.core.recipes import RecipeError, find_recipe, recipes, resolve_config
from visiontl.cli.commands import EXTRA_COMMANDS, LIGHTNING_COMMANDS, main

CHECKOUT_RECIPES = Path(__file__).parents[2] / "recipes"


def test_help_lists_every_command_once_without_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may warn on the way to the overview
        assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("  --")]
    assert sorted(listed) == sorted([*LIGHTNING_COMMANDS, *EXTRA_COMMANDS])  # each command exactly once
    assert main([]) == 0 and capsys.readouterr().out == out  # no arguments: the same overview
    from visiontl import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"visiontl {__version__}"
    assert main(["fitt"]) == 2 and "Did you mean `visiontl fit`?" in capsys.readouterr().err


def test_bundled_recipes_are_the_checkout_recipes_and_each_has_a_description() -> None:
    found = recipes()
    assert {r.name for r in found} == {p.relative_to(CHECKOUT_RECIPES).with_suffix("").as_posix()
                                       for p in CHECKOUT_RECIPES.rglob("*.yaml")}
    assert len(found) >= 18
    for recipe in found:
        assert recipe.description and len(recipe.description) <= 114, recipe.name
        assert "visiontl" in recipe.path.read_text() and yaml.safe_load(recipe.path.read_text())  # text, valid YAML
    assert find_recipe("satellite/eurosat-rgb").description.startswith("EuroSAT RGB: 27,000 Sentinel-2 tiles")
    # a prefix, the folder name and the extension are optional; a file name alone when it is unique
    for spelling in ("recipe:satellite/eurosat-rgb", "recipes/satellite/eurosat-rgb.yaml", "eurosat-rgb"):
        assert find_recipe(spelling).name == "satellite/eurosat-rgb"
    assert resolve_config("my.yaml") == "my.yaml"  # not a recipe: as given


def test_an_unknown_recipe_lists_the_bundled_ones_closest_first(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RecipeError, match=r"No bundled recipe 'satelite/eurosat-rbg'\. Bundled recipes \(closest "
                                          r"first\): satellite/eurosat-rgb, "):
        find_recipe("satelite/eurosat-rbg")
    assert main(["fit", "--config", "recipe:chest-xrays"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No bundled recipe 'chest-xrays'. Bundled recipes (closest first): medical/chest-xray,")
    assert all(r.name in err for r in recipes())


def test_recipes_command_lists_shows_and_locates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(f"{r.name}  " in out or out.count(r.name) for r in recipes())
    assert "satellite/eurosat-rgb" in out and "EuroSAT RGB: 27,000 Sentinel-2 tiles" in out
    assert main(["recipes", "show", "folder"]) == 0
    assert capsys.readouterr().out == (CHECKOUT_RECIPES / "folder.yaml").read_text()
    assert main(["recipes", "path", "folder"]) == 0
    assert Path(capsys.readouterr().out.strip()) == find_recipe("folder").path
    assert main(["recipes", "show", "nope"]) == 2


def test_fit_takes_a_bundled_recipe_by_name(shapes_root: Path, tmp_path: Path) -> None:
    args = ["--data.init_args.root", str(shapes_root), "--model.init_args.backbone", "test_resnet",
            "--model.init_args.pretrained", "false", "--data.init_args.image_size", "32",
            "--data.init_args.num_workers", "0", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    assert main(["fit", "--config", "recipe:folder", *args]) == 0
    assert main(["fit", "--config=recipe:folder.yaml", *args]) == 0
    runs = sorted(p.name for p in (tmp_path / "folder").iterdir())
    assert runs == ["version_0", "version_1"]
    assert json.loads((tmp_path / "folder" / "version_0" / "metrics.json").read_text())["steps"] == 2


def test_doctor_reports_and_never_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from visiontl.cli import doctor

    monkeypatch.setenv("VISIONTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "features").mkdir(parents=True)
    (tmp_path / "cache" / "features" / "x.npy").write_bytes(b"\0" * 2048)
    assert main(["doctor", "--json", str(tmp_path / "doctor.json")]) == 0
    out = capsys.readouterr().out
    facts = json.loads((tmp_path / "doctor.json").read_text())
    import torch

    assert facts["packages"]["torch"] == torch.__version__.split("+")[0]
    assert facts["cache"] == f"{tmp_path / 'cache'} (0.0 MiB in 1 files)"
    assert "instruction sets" in facts["cpu"] and "GPUs" in facts["torch"]
    assert "CPUExecutionProvider" in facts["onnxruntime providers"]
    assert "torch:" in out and "instruction sets:" in out
    # a probe that breaks is reported, not raised
    monkeypatch.setattr(doctor, "_cpu", lambda: 1 / 0)
    monkeypatch.setattr(doctor, "_version", lambda name: (_ for _ in ()).throw(OSError("metadata unreadable")))
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "cpu: unknown (ZeroDivisionError" in out.replace("  ", " ") or "unknown (ZeroDivisionError" in out
    assert "unknown (OSError: metadata unreadable)" in out


def test_quiet_filters_noise_keeps_data_warnings_and_puts_everything_back() -> None:
    from visiontl.core.quiet import quiet

    lightning = logging.getLogger("pytorch_lightning")
    before_level, before_filters = lightning.level, list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet(verbose=False):
            assert lightning.getEffectiveLevel() >= logging.WARNING  # no GPU-available / strategy lines
            warnings.warn("The number of training batches (3) is smaller than the logging interval", UserWarning)
            warnings.warn_explicit("old API", DeprecationWarning, "dep.py", 1, module="somelib.sub")
            warnings.warn_explicit("ours", DeprecationWarning, "v.py", 1, module="visiontl.data")
            warnings.warn("[visiontl] data check: 3 image(s) have a side below 32 px", UserWarning)
    assert [str(w.message) for w in caught] == ["ours", "[visiontl] data check: 3 image(s) have a side below 32 px"]
    assert lightning.level == before_level and warnings.filters == before_filters


def test_quiet_fine_tune_shows_one_bar_and_no_lightning_lines(shapes_root: Path, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from visiontl import fine_tune

    monkeypatch.setenv("VISIONTL_PROGRESS", "1")  # as on a terminal (captured output is not one: no bar there)

    result = fine_tune(shapes_root, backbone="test_resnet", strategy="full", pretrained=False, image_size=32, steps=4,
                       out=tmp_path, name="quiet", data_kwargs={"num_workers": 0, "batch_size": 8}, verbose=False)
    out, err = capfd.readouterr()
    assert result.trainer.global_step == 4
    documented = (Path(__file__).parents[2] / "docs" / "reference" / "metrics-json.md").read_text()
    written = json.loads((result.run_dir / "metrics.json").read_text())
    assert [k for k in written if f"| `{k}` |" not in documented] == []  # every key has its row in the reference
    assert "Tip:" not in out + err and "GPU available" not in out + err and "parameters train now" not in out + err
    assert "quiet:" in err and "4/4" in err  # the one bar: the run's name and its steps
    assert "Validation DataLoader" not in out + err and "Epoch 0" not in out + err  # Lightning's bars are off


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_its_install_lists_them(tmp_path: Path) -> None:
    """Build the wheel, find every recipe inside, install it (no dependencies: ``recipes`` and
    ``--version`` need none) into a fresh venv outside the checkout and run the command there."""
    repo = Path(__file__).parents[2]
    build = [sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "-w", str(tmp_path / "dist"), "-q"]
    try:
        import setuptools  # noqa: F401 - the build backend, present: build without fetching it again
        build.append("--no-build-isolation")
    except ImportError:
        pass
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("visiontl-*.whl"))
    inside = {n.removeprefix("visiontl/recipes/") for n in zipfile.ZipFile(wheel).namelist()
              if n.startswith("visiontl/recipes/")}
    assert inside == {p.relative_to(CHECKOUT_RECIPES).as_posix() for p in CHECKOUT_RECIPES.rglob("*.yaml")}
    venv.create(tmp_path / "env", with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    outside = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path, env=outside)
    script = tmp_path / "env" / "bin" / "visiontl"
    listed = subprocess.run([str(script), "recipes"], capture_output=True, text=True, cwd=tmp_path, check=True,
                            env=outside)
    assert "satellite/eurosat-rgb" in listed.stdout and str(tmp_path / "env") in listed.stdout  # from the install
    shown = subprocess.run([str(script), "recipes", "show", "satellite/eurosat-rgb"], capture_output=True, text=True,
                           cwd=tmp_path, check=True, env=outside)
    assert shown.stdout == (CHECKOUT_RECIPES / "satellite" / "eurosat-rgb.yaml").read_text()
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, check=True,
                             env=outside)
    from visiontl import __version__

    assert version.stdout.strip() == f"visiontl {__version__}"


def test_every_command_prints_its_help_without_importing_torch() -> None:
    """``visiontl <command> --help`` answers at once: neither torch nor Lightning is imported for it
    (LightningCLI's own commands, fit / validate / test / predict, read the classes' signatures)."""
    import subprocess
    import sys

    from visiontl.cli.commands import EXTRA_COMMANDS

    script = (
        "import contextlib, io, sys\n"
        "from visiontl.cli.commands import main\n"
        f"for command in {sorted(EXTRA_COMMANDS)!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([command, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    heavy = sorted(m for m in ('torch', 'pytorch_lightning', 'timm') if m in sys.modules)\n"
        "    print(command, 'usage:' in out.getvalue(), ','.join(heavy) or '-')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert len(rows) == len(EXTRA_COMMANDS)
    assert [r for r in rows if r[1] != "True" or r[2] != "-"] == [], proc.stdout
