"""Images the tests compare and send: PSNR, PNG bytes, an independent fp32 reference."""

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from services.upscaler.models import SPECS_BY_NAME, build_module


def psnr(a: np.ndarray, b: np.ndarray, maximum: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(maximum**2 / mse)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png(array: np.ndarray, mode: str | None = None, **options) -> bytes:
    return encoded(Image.fromarray(np.ascontiguousarray(array), mode), "PNG", **options)


def fp32_untiled(model_dir, image: np.ndarray) -> np.ndarray:
    """Independent reference: the network on the whole image in fp32, no engine code."""
    module = build_module(SPECS_BY_NAME["realesr-general-x4v3"], model_dir / "realesr-general-x4v3.fp16-derived.pth")
    with torch.inference_mode():
        x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
        y = module(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.rint(y * 255).astype(np.uint8)


def logo_on_white() -> np.ndarray:
    """Drawn at 4x and reduced, so its edges are anti-aliased like a real logo's."""
    image = Image.new("RGB", (960, 560), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((80, 80, 440, 440), fill=(200, 30, 30))
    draw.rectangle((520, 120, 880, 440), fill=(20, 40, 160))
    draw.rectangle((640, 220, 760, 340), fill="white")  # an enclosed counter, like the inside of an O
    return np.asarray(image.resize((240, 140), Image.LANCZOS))
