"""The dependency range the pack declares is the range the suite tests.

requirements.txt (what ComfyUI-Manager installs) and pyproject.toml list the same runtime
requirements. Each lower bound is pinned in the oldest test set (requirements/test-transformers4.txt,
the set pip resolves beside transformers 4.x), the newest set (requirements/test.txt) lies inside
every range, and whichever of the two environments runs this file satisfies the declared ranges.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from dreambooth_test_support.paths import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

RUNTIME = REPO_ROOT / "requirements.txt"
NEWEST = REPO_ROOT / "requirements" / "test.txt"
OLDEST = REPO_ROOT / "requirements" / "test-transformers4.txt"


def read_requirements(path: Path, seen: frozenset[Path] = frozenset()) -> list[Requirement]:
    """The requirements of a pip requirements file, following ``-r`` includes as pip does."""
    path = path.resolve()
    assert path not in seen, f"include cycle through {path}"
    found: list[Requirement] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0] in ("-r", "--requirement"):
            found += read_requirements(path.parent / parts[1], seen | {path})
            continue
        assert not line.startswith("-"), f"{path.name}: option {line!r} is not expected here"
        found.append(Requirement(line))
    return found


def pins(path: Path) -> dict[str, Version]:
    """Exact ``==`` pins of a requirements file and its includes, by canonical name."""
    pinned: dict[str, Version] = {}
    for req in read_requirements(path):
        for spec in req.specifier:
            if spec.operator == "==":
                name = canonicalize_name(req.name)
                assert name not in pinned, f"{req.name} is pinned twice for {path.name}"
                pinned[name] = Version(spec.version)
    return pinned


def load_pyproject() -> dict:
    try:
        import tomllib  # novermin - 3.11+, with the tomli fallback below for 3.10
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def runtime_requirements() -> list[Requirement]:
    reqs = read_requirements(RUNTIME)
    assert reqs, "requirements.txt lists nothing"
    return reqs


def test_pyproject_lists_the_same_requirements() -> None:
    declared = [str(Requirement(r)) for r in load_pyproject()["project"]["dependencies"]]
    assert declared == [str(r) for r in runtime_requirements()]


def test_torch_is_never_a_runtime_requirement() -> None:
    # ComfyUI owns torch; a requirement on it lets pip replace ComfyUI's CUDA build.
    names = {canonicalize_name(r.name) for r in runtime_requirements()}
    assert not names & {"torch", "torchvision", "torchaudio", "xformers"}, names


def test_each_lower_bound_is_pinned_in_the_oldest_test_set() -> None:
    oldest = pins(OLDEST)
    for req in runtime_requirements():
        specs = list(req.specifier)
        assert [s.operator for s in specs] == [">="], f"{req}: give one lower bound, the tested one"
        bound = Version(specs[0].version)
        pinned = oldest.get(canonicalize_name(req.name))
        assert pinned is not None, f"{req}: {OLDEST.name} must pin {req.name} at its lower bound"
        # A bound of 4.57 is tested by 4.57.x: compare as many release parts as the bound has.
        assert pinned.release[: len(bound.release)] == bound.release, (
            f"{req}: the oldest tested {req.name} is {pinned}; set the bound to that version"
        )


@pytest.mark.parametrize("path", [NEWEST, OLDEST], ids=lambda p: p.name)
def test_test_sets_lie_inside_the_declared_ranges(path: Path) -> None:
    pinned = pins(path)
    for req in runtime_requirements():
        version = pinned.get(canonicalize_name(req.name))
        if version is not None:
            assert req.specifier.contains(version, prereleases=True), f"{path.name} pins {req.name} {version}"


def test_the_two_sets_differ_in_the_transformers_major() -> None:
    # The point of the second set: transformers 4.x with diffusers < 0.40 beside the 5.x set.
    newest, oldest = pins(NEWEST), pins(OLDEST)
    assert newest["transformers"].major >= 5 and oldest["transformers"].major == 4
    assert oldest["diffusers"] < newest["diffusers"]


def test_this_environment_satisfies_the_declared_ranges() -> None:
    missing, outside = [], []
    for req in runtime_requirements():
        try:
            version = Version(importlib.metadata.version(req.name))
        except importlib.metadata.PackageNotFoundError:
            missing.append(req.name)
            continue
        if not req.specifier.contains(version, prereleases=True):
            outside.append(f"{req.name} {version} (declared {req.specifier})")
    assert not missing and not outside, f"missing: {missing}; outside the declared range: {outside}"
