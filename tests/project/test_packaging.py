"""What the package page and a fresh install see: a licence, metadata, links that work off GitHub,
and a core without the libraries only one feature uses."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
REPO = {"https://github.com/visiontl/visiontl/blob/main/", "https://github.com/visiontl/visiontl/tree/main/",
        "https://raw.githubusercontent.com/visiontl/visiontl/main/"}


def test_the_licence_is_a_file_and_an_spdx_expression() -> None:
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").lstrip().startswith("Apache License")
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert any(c.startswith("Programming Language :: Python :: 3.") for c in PROJECT["classifiers"])
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(PROJECT["urls"])
    assert "Apache License 2.0" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_links_work_on_a_package_index() -> None:
    """The README is the wheel's long description: every link is absolute, and each one into this
    repository names a file or folder that exists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(targets) > 20
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert relative == []
    for target in targets:
        prefix = next((p for p in REPO if target.startswith(p)), None)
        if prefix is not None:
            path = ROOT / target[len(prefix):].split("#")[0]
            assert path.exists(), target


def test_one_feature_libraries_are_extras() -> None:
    core = " ".join(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    for library, extra in (("tifffile", "tiff"), ("pydicom", "dicom"), ("lightly", "ssl"), ("scikit-learn", "lowres")):
        assert library not in core, library
        assert any(dep.startswith(library) for dep in extras[extra]), (library, extra)
        assert extra in extras["all"][0]
    package = ROOT / "visiontl"
    plain = [f"{p.relative_to(ROOT)}:{i}" for p in package.rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.match(r"\s*(import (tifffile|lightly|sklearn)|from (tifffile|sklearn)\b)", line)]
    assert plain == []  # imported through visiontl.core.extras.require, which names the extra
    assert (package / "py.typed").is_file()
