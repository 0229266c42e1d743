import threading
import time

import numpy as np
import pytest
from PIL import Image

from services.common.contract import output_size
from services.upscaler.backends import ArrayBackend, FunctionBackend
from services.upscaler.engine import CPU_MAX_TILE, UpscaleEngine
from services.upscaler.lanes import InferenceLanes
from services.upscaler.models import ModelRegistry
from support.images import fp32_untiled, psnr


@pytest.fixture(scope="module")
def registry(model_dir):
    # Exact, and at a fixed tile: nothing timed (calibration is tested apart).
    registry = ModelRegistry(model_dir, threads=2, backend="torch-fp32", tile=CPU_MAX_TILE)
    registry.load_all()
    return registry


@pytest.fixture(scope="module")
def general(registry):
    return registry.resolve("realesr-general-x4v3").engine


@pytest.fixture(scope="module")
def lanczos(registry):
    return registry.resolve("lanczos").engine


@pytest.mark.parametrize("scale", [1, 2, 2.5, 3, 4, 8])
def test_any_scale_gives_the_exact_size(general, lanczos, scale):
    image = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    for engine in (general, lanczos):
        out = engine.upscale(image, "RGB", scale, tile=8)
        assert out.shape == (round(13 * scale), round(17 * scale), 3)
    assert output_size(17, 13, scale) == (round(17 * scale), round(13 * scale))


def test_passes_follow_the_native_scale(general):
    assert [general.passes_for(s) for s in (1, 2, 3.9, 4, 7.5, 8)] == [1, 1, 1, 1, 1, 1]
    x2 = UpscaleEngine(FunctionBackend(lambda x: x), 2)
    assert [x2.passes_for(s) for s in (1.5, 2, 3, 4, 8)] == [1, 1, 1, 2, 3]


def test_tiled_output_matches_an_untiled_fp32_run(general, model_dir, photo):
    reference = fp32_untiled(model_dir, photo)
    for tile in (32, 48):
        tiled = general.upscale(photo, "RGB", 4, tile=tile)
        assert psnr(tiled, reference) >= 45


def test_lanczos_fallback_tiles_match_untiled(lanczos, photo):
    whole = lanczos.upscale(photo, "RGB", 3.3, tile=4096)
    tiled = lanczos.upscale(photo, "RGB", 3.3, tile=17)
    assert np.abs(whole.astype(int) - tiled).max() <= 1
    plain = np.asarray(Image.fromarray(photo).resize(whole.shape[1::-1], Image.LANCZOS))
    assert whole.std() > plain.std()  # the unsharp mask adds contrast


def test_rgba_keeps_alpha_and_colour_is_unaffected(general, photo):
    yy, xx = np.mgrid[: photo.shape[0], : photo.shape[1]]
    alpha = (255 * ((yy - 48) ** 2 + (xx - 64) ** 2 < 35**2)).astype(np.uint8)
    rgba = np.dstack([photo, alpha])
    out = general.upscale(rgba, "RGBA", 4, tile=48)
    assert out.shape == (384, 512, 4)
    assert np.array_equal(out[:, :, :3], general.upscale(photo, "RGB", 4, tile=48))
    lanczos_alpha = np.asarray(Image.fromarray(alpha.astype(np.float32) / 255, "F").resize((512, 384), Image.LANCZOS))
    assert np.abs(out[:, :, 3].astype(float) - np.clip(lanczos_alpha, 0, 1) * 255).max() <= 1
    through_model = general.upscale(rgba, "RGBA", 4, tile=48, alpha_through_model=True)[:, :, 3]
    assert psnr(through_model, out[:, :, 3]) > 25 and not np.array_equal(through_model, out[:, :, 3])


def test_16bit_in_16bit_out(general, photo):
    sixteen = photo.astype(np.uint16) * 257
    out = general.upscale(sixteen, "RGB", 4, tile=48)
    assert out.dtype == np.uint16
    eight = general.upscale(photo, "RGB", 4, tile=48)
    assert psnr(out, eight.astype(np.uint16) * 257, 65535) > 45
    assert len(np.unique(out % 257)) > 1  # real 16-bit values, not 8-bit ones widened


def test_grey_in_grey_out(general, photo):
    grey = np.asarray(Image.fromarray(photo).convert("L"))[:, :, None]
    out = general.upscale(grey, "L", 4, tile=48)
    assert out.shape == (384, 512, 1)
    via_rgb = general.upscale(np.repeat(grey, 3, axis=2), "RGB", 4, tile=48).mean(axis=2, keepdims=True)
    assert psnr(out, via_rgb) > 45


def test_the_on_device_path_equals_the_host_arrays_path(general, photo):
    # the same torch network called on float arrays, as onnxruntime, OpenVINO and ncnn are
    plain = UpscaleEngine(FunctionBackend(general.model), 4, halo=general.default_halo)
    alpha = np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None].repeat(photo.shape[0], 0)
    for image, mode in ((photo, "RGB"), (np.dstack([photo, alpha]), "RGBA"), (photo.astype(np.uint16) * 257, "RGB")):
        fast = general.upscale(image, mode, 4, tile=48)
        slow = plain.upscale(image, mode, 4, tile=48)
        assert fast.dtype == slow.dtype and np.abs(fast.astype(int) - slow).max() <= 1, mode


class ThreadCountingModel(ArrayBackend):
    """A 2x network that records the threads each call was given and the threads in use at once."""

    adapts_threads = True

    def __init__(self):
        self.widths: list[int] = []
        self.in_use = self.most_in_use = self.most_calls = self.calls = 0
        self.counting = threading.Lock()

    def __call__(self, x, threads=0):
        with self.counting:
            self.widths.append(threads)
            self.in_use += threads
            self.calls += 1
            self.most_in_use, self.most_calls = max(self.most_in_use, self.in_use), max(self.most_calls, self.calls)
        time.sleep(0.01)
        with self.counting:
            self.in_use -= threads
            self.calls -= 1
        return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)


def upscale_at_once(engine, requests: int, size: tuple[int, int] = (32, 32)) -> None:
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    workers = [
        threading.Thread(target=engine.upscale, args=(image, "RGB", 2), kwargs={"tile": 16}) for _ in range(requests)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@pytest.mark.parametrize(
    "size, widths",
    [
        ((16, 16), [4]),  # one tile: every thread
        ((32, 32), [2, 2, 2, 2]),  # four tiles, two at a time, each on half the threads
        ((16, 48), [2, 2, 2]),  # the third starts while the second still renders
    ],
)
def test_a_lone_request_renders_its_tiles_in_lanes_and_a_tile_alone_on_every_thread(size, widths):
    model = ThreadCountingModel()
    upscale_at_once(UpscaleEngine(model, 2, halo=2, lanes=InferenceLanes(threads=4, lanes=2)), 1, size)
    assert sorted(model.widths) == widths
    assert model.most_in_use <= 4 and model.most_calls == min(2, len(widths))


def test_tiles_rendered_together_land_where_they_belong():
    image = np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    together = UpscaleEngine(ThreadCountingModel(), 2, halo=2, lanes=InferenceLanes(threads=2, lanes=2))
    alone = UpscaleEngine(ThreadCountingModel(), 2, halo=2)
    assert together.tiles_together == 2 and alone.tiles_together == 1
    assert np.array_equal(together.upscale(image, "RGB", 2, tile=16), alone.upscale(image, "RGB", 2, tile=16))


def test_a_slow_tile_holds_up_no_other_tile_of_its_request():
    others_done = threading.Event()

    class FirstWaitsForTheOthers(ThreadCountingModel):
        def __call__(self, x, threads=0):
            first = x.mean() > 0.5  # only the first tile is bright
            if first:
                others_done.wait(timeout=30)  # a bound, so that a failure fails rather than hangs
            out = super().__call__(x, threads)
            if not first and len(self.widths) == 3:
                others_done.set()
            return out

    image = np.zeros((16, 64, 3), np.uint8)
    image[:, :16] = 255
    engine = UpscaleEngine(FirstWaitsForTheOthers(), 2, halo=2, lanes=InferenceLanes(threads=2, lanes=2))
    out = engine.upscale(image, "RGB", 2, tile=16)
    assert others_done.is_set() and out[:, :32].min() == 255 and out[:, 36:].max() == 0


def test_a_failing_tile_fails_the_request_once_no_other_tile_is_rendering():
    class FailsFirst(ThreadCountingModel):
        failed = False

        def __call__(self, x, threads=0):
            with self.counting:
                first, self.failed = not self.failed, True
            if first:
                time.sleep(0.005)  # the other lane has begun its tile by now
                raise RuntimeError("the network failed")
            return super().__call__(x, threads)

    model = FailsFirst()
    engine = UpscaleEngine(model, 2, halo=2, lanes=InferenceLanes(threads=2, lanes=2))
    with pytest.raises(RuntimeError, match="the network failed"):
        engine.upscale(np.zeros((16, 64, 3), np.uint8), "RGB", 2, tile=16)
    assert model.calls == 0  # no other tile was still rendering when the error came out


@pytest.mark.parametrize("lanes", [2, 4])
def test_requests_in_flight_share_the_threads_in_lanes(lanes):
    model = ThreadCountingModel()
    upscale_at_once(UpscaleEngine(model, 2, halo=2, lanes=InferenceLanes(threads=4, lanes=lanes)), 4)
    assert model.most_in_use <= 4  # never more threads than the machine was given
    assert 4 // lanes in model.widths and model.most_calls == lanes  # narrow calls, as many at once as lanes


def test_backends_that_cannot_narrow_run_one_call_at_a_time_on_every_thread():
    calls, most = 0, 0
    counting = threading.Lock()

    def model(x):  # a plain callable, like torch, cannot be given fewer threads
        nonlocal calls, most
        with counting:
            calls += 1
            most = max(most, calls)
        time.sleep(0.01)
        with counting:
            calls -= 1
        return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)

    upscale_at_once(UpscaleEngine(FunctionBackend(model), 2, halo=2, lanes=InferenceLanes(threads=4, lanes=2)), 4)
    assert most == 1


def test_each_image_gets_the_timed_tile_it_takes_least_time_in():
    def nearest(x):
        return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)

    by_memory = UpscaleEngine(FunctionBackend(nearest), 2, halo=16, bytes_per_input_pixel=1)
    assert by_memory.plan(2000, 2000, 2).tile == CPU_MAX_TILE  # untimed, a tiny model: memory allows the most
    speeds = {96: 1.0e6, 192: 1.2e6, 256: 1.1e6}  # input pixels per second, halo included
    timed = UpscaleEngine(FunctionBackend(nearest), 2, halo=16, bytes_per_input_pixel=1, tile_speeds=speeds)
    assert timed.plan(2000, 2000, 2).tile == 192  # a big image: the fastest per pixel
    assert timed.plan(250, 240, 2).tile == 256  # one 256 tile holds it: no halo beats 192's speed
    assert timed.plan(2000, 2000, 2, tile=320).tile == 320  # a request that names its tile gets it
    hungry = UpscaleEngine(FunctionBackend(nearest), 2, halo=16, bytes_per_input_pixel=10**9, tile_speeds=speeds)
    assert hungry.plan(2000, 2000, 2).tile < 96  # memory still rules
    image = np.random.default_rng(5).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    assert np.array_equal(timed.upscale(image, "RGB", 2), by_memory.upscale(image, "RGB", 2))
