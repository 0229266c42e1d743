"""Upscales spread over two upscaler replicas in bands: the answer is the image a
single replica gives, whatever the size, scale, mode, depth and band height
(regression: bands were sent as one message per band, over the 1 MiB cap).

A band is resampled with its own tile layout, so where the scale's inverse is not
exact in binary (3x) a pixel may round one level apart from the single run."""

import httpx
import numpy as np
import pytest
from skimage.transform import resize

from services.common import imageio
from support.images import psnr
from support.processes import free_port, mesh_addresses, start_gateway, start_service

MODES = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}


@pytest.fixture(scope="module")
def banded_gateways(tmp_path_factory, model_dir, mesh_ports):
    """Two upscaler replicas (the same backend as the mesh's single one) and two gateways
    that cut upscales into bands over them: 64 and 100 input rows a band."""
    replicas = [
        start_service("upscaler", tmp_path_factory, model_dir, free_port(), mesh_addresses(mesh_ports))
        for _ in range(2)
    ]
    addresses = {**mesh_addresses(mesh_ports), "UPSCALER_ADDRESS": ",".join(r.address for r in replicas)}
    gateways = {
        rows: start_gateway(
            tmp_path_factory, mesh_ports, RATE_LIMIT_PER_MINUTE="0", UPSCALE_BAND_ROWS=str(rows), **addresses
        )
        for rows in (64, 100)
    }
    yield replicas, gateways
    for service in [*gateways.values(), *replicas]:
        service.stop()


def picture(width: int, height: int, mode: str, bits: int, seed: int) -> np.ndarray:
    """Smooth shapes and noise, so that resampling differences would show."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((max(2, height // 16), max(2, width // 16), MODES[mode]))
    smooth = resize(coarse, (height, width), order=3, mode="reflect")
    image = np.clip(0.8 * smooth + 0.2 * rng.random(smooth.shape), 0, 1)
    return np.round(image * (2**bits - 1)).astype(np.uint16 if bits == 16 else np.uint8)


def upscale(url: str, data: bytes, scale: int, model: str) -> imageio.DecodedImage:
    reply = httpx.post(
        f"{url}/v1/upscale",
        files={"file": ("in.png", data)},
        data={"scale": str(scale), "model": model, "format": "png"},
        timeout=300,
    )
    assert reply.status_code == 200, reply.text
    return imageio.decode(reply.content, max_bytes=1 << 30, max_pixels=1 << 30)


CASES = [  # width, height, mode, bits, scale
    (448, 640, "RGB", 8, 4),  # the reported image: bands of 1792x256+ output rows
    (333, 517, "RGBA", 8, 3),
    (129, 257, "L", 8, 8),
    (200, 301, "LA", 8, 2),
    (97, 450, "RGB", 16, 4),
    (64, 211, "RGBA", 16, 8),
    (5, 333, "L", 16, 4),
    (700, 65, "RGB", 8, 2),
]


@pytest.mark.parametrize("width,height,mode,bits,scale", CASES)
def test_banded_upscale_equals_a_single_replica_run(banded_gateways, gateway, width, height, mode, bits, scale):
    _, gateways = banded_gateways
    pixels = picture(width, height, mode, bits, seed=width * height)
    data = imageio.encode_png(pixels, mode)
    single = upscale(gateway.url, data, scale, "lanczos")
    assert (single.width, single.height, single.mode) == (width * scale, height * scale, mode)
    for rows, banded in gateways.items():
        out = upscale(banded.url, data, scale, "lanczos")
        assert out.mode == single.mode and out.pixels.dtype == single.pixels.dtype
        difference = np.abs(out.pixels.astype(np.int64) - single.pixels.astype(np.int64))
        one_level = 257 if bits == 16 else 1
        assert difference.max() <= one_level, f"bands of {rows} rows differ from one replica's answer"
        if scale in (2, 4, 8):
            assert difference.max() == 0


def test_banded_model_upscale_matches_a_single_replica_run(banded_gateways, gateway):
    """Real-ESRGAN in bands: each band has context rows beyond the model's halo, so the
    seams between bands are as invisible as those between the model's own tiles."""
    _, gateways = banded_gateways
    pixels = picture(96, 200, "RGB", 8, seed=7)
    data = imageio.encode_png(pixels, "RGB")
    single = upscale(gateway.url, data, 4, "realesr-general-x4v3")
    out = upscale(gateways[64].url, data, 4, "realesr-general-x4v3")
    assert out.pixels.shape == single.pixels.shape == (800, 384, 3)
    assert psnr(out.pixels, single.pixels) >= 45
