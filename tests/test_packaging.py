"""The lock files follow pyproject.toml's declarations (tools/lock.py writes them)."""
import re

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
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"{lock} pins {name}=={pinned[name]}, outside {requirement} (run make lock)"


def test_the_images_pin_what_development_pins():
    development = pins((ROOT / DEVELOPMENT).read_text())
    for lock in LOCKS:
        for name, version in pins((ROOT / lock).read_text()).items():
            assert development.get(name) == version, (lock, name)


def test_extras_follow_the_projects_references_to_its_own_extras(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "imagemesh"\ndependencies = ["numpy>=2"]\n'
                         '[project.optional-dependencies]\na = ["imagemesh[b]", "redis"]\nb = ["imagemesh[a]", "rich"]\n')
    assert sorted(str(r) for r in declared(("a",), pyproject)) == ["numpy>=2", "redis", "rich"]
    assert [str(r) for r in declared((), pyproject)] == ["numpy>=2"]


def test_the_dockerfiles_own_pins_agree_with_development():
    development = pins((ROOT / DEVELOPMENT).read_text())
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        for name, version in re.findall(r"\b([A-Za-z][\w.\-]*)==([\w.]+)", dockerfile.read_text()):
            same_as = canonicalize_name(name).removesuffix("-gpu")  # the CUDA build of a CPU package
            assert development[same_as] == version, (dockerfile.name, name)
