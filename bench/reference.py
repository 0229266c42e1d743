"""The reference: `RealESRGANer` from the realesrgan package, imported from
the benchmark's own folder (.bench/reference, installed --no-deps by `make
bench`). realesrgan and basicsr import torchvision at module level, and no
CPU build of torchvision exists here: this harness (never the product) puts
stand-ins for the few names they import in its place. Inference never calls them."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent.parent / ".bench" / "reference"


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"torchvision.{name} is not available in the benchmark harness")

    return call


def _stub_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    names = {
        "torchvision": [],
        "torchvision.utils": ["make_grid"],
        "torchvision.transforms": ["Normalize", "ToTensor", "Compose"],
        "torchvision.transforms.functional": ["rgb_to_grayscale", "normalize", "to_tensor"],
        "torchvision.transforms.functional_tensor": ["rgb_to_grayscale"],
        "torchvision.ops": ["deform_conv2d"],
        "torchvision.models": [],
        "torchvision.models.vgg": ["vgg19", "vgg16", "vgg19_bn", "vgg16_bn"],
    }
    for module_name, attributes in names.items():
        module = types.ModuleType(module_name)
        module.__path__ = []  # a package, so that submodules import
        module.__spec__ = importlib.machinery.ModuleSpec(module_name, None, is_package=True)  # for find_spec
        for attribute in attributes:
            setattr(module, attribute, _unavailable(attribute))
        sys.modules[module_name] = module
    for module_name in names:
        parent, _, child = module_name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[module_name])


def load():
    """(RealESRGANer, SRVGGNetCompact) from the reference package."""
    if not (REFERENCE_DIR / "realesrgan").is_dir():
        raise SystemExit("the reference is not installed: run `make bench` (it installs realesrgan into .bench/)")
    _stub_torchvision()
    sys.path.insert(0, str(REFERENCE_DIR))
    from realesrgan import RealESRGANer
    from realesrgan.archs.srvgg_arch import SRVGGNetCompact

    return RealESRGANer, SRVGGNetCompact
