import hashlib
import logging
import os
import shutil
import time

import numpy as np
import pytest
import torch

from services import fetch_models
from services.bgremoval.fetch import downloads as bgremoval_downloads
from services.common.errors import ModelNotFound, ModelNotReady
from services.common.fetch import Download, FetchError, fetch
from services.upscaler import fetch as upscaler_fetch
from services.upscaler.arch import RRDBNet
from services.upscaler.backends import ArrayBackend, Candidate, cpu_has_bf16
from services.upscaler.calibration import LADDER_CONTENDERS, LADDER_RUNS, calibrate, calibration_tile, read_record
from services.upscaler.engine import CPU_MAX_TILE, tile_ladder
from services.upscaler.models import SPECS, SPECS_BY_NAME, ModelRegistry, sha256_of
from support.images import psnr

UPSCALER_FILES = sorted({name for spec in SPECS for name in spec.files})


def registry_for(directory, tmp_path, backend="torch-fp32", tile=None, **settings):
    # A backend named at a fixed tile is not timed at start: only calibration's own tests wait for that.
    if tile is None:
        tile = 0 if backend == "auto" else CPU_MAX_TILE
    registry = ModelRegistry(
        directory, backend=backend, onnx_cache_dir=tmp_path / "onnx", threads=2, tile=tile, **settings
    )
    registry.load_all()
    return registry


def only(tmp_path, source, name):
    directory = tmp_path / f"models-{name}"
    directory.mkdir()
    os.symlink(source / name, directory / name)
    return directory


def test_every_upscaler_file_in_the_shared_folder_loads(model_dir, tmp_path, photo):
    present = [name for name in UPSCALER_FILES if (model_dir / name).is_file()]
    assert {
        "realesr-animevideov3.pth",
        "realesr-general-x4v3_fp16.onnx",
        "realesr-general-x4v3.fp16-derived.pth",
    } <= set(present)
    for name in present:
        registry = registry_for(only(tmp_path, model_dir, name), tmp_path, "auto")
        ready = [m for m in registry.models.values() if m.ready and m.name != "lanczos"]
        assert [m.file_name for m in ready] == [name], name
        assert ready[0].backend.startswith(
            ("onnxruntime", "openvino") if name.endswith(".onnx") else ("torch", "onnxruntime", "openvino", "ncnn")
        )
        out = ready[0].engine.upscale(photo[:24, :24], "RGB", 4)
        assert out.shape == (96, 96, 3) and out.std() > 10


def test_official_checksum_is_recognised(model_dir, tmp_path):
    registry = registry_for(model_dir, tmp_path)
    assert registry.models["realesr-animevideov3"].sha256_matches
    assert not registry.models["realesr-general-x4v3"].sha256_matches  # a derived file, not the release


@pytest.mark.parametrize("model", ["realesr-general-x4v3", "realesr-animevideov3"])
def test_torch_and_onnxruntime_backends_agree(model_dir, tmp_path, photo, model):
    torch_engine = registry_for(model_dir, tmp_path, "torch-fp32").resolve(model)
    ort_model = registry_for(model_dir, tmp_path, "onnxruntime").resolve(model)
    assert (torch_engine.backend, ort_model.backend) == ("torch-fp32", "onnxruntime")
    a = torch_engine.engine.upscale(photo, "RGB", 4, tile=64)
    b = ort_model.engine.upscale(photo, "RGB", 4, tile=64)
    assert psnr(a, b) >= 45


@pytest.mark.parametrize("model", ["realesr-general-x4v3", "realesr-animevideov3"])
@pytest.mark.parametrize("backend", ["openvino", "ncnn", "ncnn-bf16"])
def test_openvino_and_ncnn_agree_with_torch(model_dir, tmp_path, photo, model, backend):
    reference = registry_for(model_dir, tmp_path, "torch-fp32").resolve(model)
    candidate = registry_for(only(tmp_path, model_dir, reference.file_name), tmp_path, backend).resolve(model)
    assert candidate.backend == backend and candidate.calibration == []  # forced, at a fixed tile: not timed
    a = reference.engine.upscale(photo, "RGB", 4, tile=64)
    b = candidate.engine.upscale(photo, "RGB", 4, tile=64)
    assert a.shape == b.shape and psnr(a, b) >= 45


def test_a_restart_reuses_the_ncnn_network_and_openvinos_compiled_model(model_dir, tmp_path):
    directory = only(tmp_path, model_dir, "realesr-animevideov3.pth")

    def cache_files() -> dict:
        return {path: path.stat().st_mtime_ns for path in (tmp_path / "onnx").rglob("*") if path.is_file()}

    for backend in ("ncnn", "openvino"):
        registry_for(directory, tmp_path, backend)
    first = cache_files()
    assert {p.suffix for p in first} >= {".param", ".bin", ".onnx", ".blob"}, first
    for backend in ("ncnn", "openvino"):
        assert registry_for(directory, tmp_path, backend).resolve("realesr-animevideov3").backend == backend
    assert cache_files() == first  # read back, nothing compiled or written again


def test_onnx_export_is_cached(model_dir, tmp_path):
    registry_for(model_dir, tmp_path, "onnxruntime")
    cached = list((tmp_path / "onnx").glob("realesr-animevideov3-*.onnx"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    registry_for(model_dir, tmp_path, "onnxruntime")
    assert cached[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("name", ["RealESRGAN_x2plus", "RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B"])
def test_rrdbnet_models_load_strictly_preferring_params_ema(tmp_path, name):
    spec = SPECS_BY_NAME[name]
    torch.manual_seed(0)
    ema, plain = RRDBNet(**spec.params), RRDBNet(**spec.params)
    for p in ema.parameters():  # small weights keep the random network's output in range
        p.data.mul_(0.1)
    (tmp_path / "m").mkdir()
    torch.save({"params": plain.state_dict(), "params_ema": ema.state_dict()}, tmp_path / "m" / spec.official_file)
    model = registry_for(tmp_path / "m", tmp_path).resolve(name)
    assert model.ready and model.backend == "torch-fp32" and not model.sha256_matches
    # Odd sizes exercise the x2 model's pixel-unshuffle padding.
    image = np.random.default_rng(0).integers(0, 256, (11, 15, 3), dtype=np.uint8)
    out = model.engine.upscale(image, "RGB", spec.scale, tile=4096)
    with torch.inference_mode():
        x = torch.from_numpy(
            np.pad(image, ((0, 11 % 2), (0, 15 % 2), (0, 0)), mode="edge").astype(np.float32) / 255
        ).permute(2, 0, 1)[None]
        expected = ema.eval()(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()[: 11 * spec.scale, : 15 * spec.scale]
    assert out.shape == (11 * spec.scale, 15 * spec.scale, 3)
    assert np.abs(out.astype(float) - np.rint(expected * 255)).max() <= 1
    if spec.scale == 2:
        assert model.engine.upscale(image, "RGB", 4, tile=8).shape == (44, 60, 3)  # two passes


def test_missing_and_broken_files_are_not_ready_with_a_reason(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "realesr-animevideov3.pth").write_bytes(b"not a checkpoint")
    registry = registry_for(tmp_path / "m", tmp_path)
    assert "could not be loaded" in registry.models["realesr-animevideov3"].reason
    assert "RealESRGAN_x4plus.pth" in registry.models["RealESRGAN_x4plus"].reason
    with pytest.raises(ModelNotReady, match="not ready"):
        registry.resolve("realesr-animevideov3")
    with pytest.raises(ModelNotFound):
        registry.resolve("no-such-model")
    assert registry.resolve("auto").name == "lanczos"  # the fallback is always there
    assert registry.resolve("").backend == "lanczos"


def test_auto_picks_the_general_model(model_dir, tmp_path):
    registry = registry_for(model_dir, tmp_path)
    assert registry.resolve("auto").name == "realesr-general-x4v3"


def test_fetch_verifies_checksums(model_dir, tmp_path):
    by_model = {d.model: d for d in upscaler_fetch.downloads()}
    item = by_model["realesr-animevideov3"]
    target = fetch(item, tmp_path / "ok", mirror=str(model_dir))
    assert sha256_of(target) == item.sha256
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    data = bytearray((model_dir / item.file).read_bytes())
    data[1000] ^= 0xFF
    (tampered / item.file).write_bytes(bytes(data))
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(item, tmp_path / "bad", mirror=str(tampered))
    assert list((tmp_path / "bad").iterdir()) == []  # nothing half-verified is left behind
    with pytest.raises(FetchError, match="no published checksum"):
        fetch(by_model["realesr-general-x4v3"], tmp_path / "x", mirror=str(tampered), require_checksum=True)


def test_fetch_verifies_rembg_md5(tmp_path):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "u2netp.onnx").write_bytes(b"not the real u2netp")
    published = {d.model: d for d in bgremoval_downloads()}["u2netp"]
    assert published.md5 == "8e83ca70e441ab06c318d82300c84806" and published.default
    with pytest.raises(FetchError, match="md5 mismatch"):
        fetch(published, tmp_path / "m", mirror=str(tmp_path / "mirror"))
    matching = Download("u2netp", "u2netp.onnx", "", md5=hashlib.md5(b"not the real u2netp").hexdigest())
    assert fetch(matching, tmp_path / "m", mirror=str(tmp_path / "mirror")).read_bytes() == b"not the real u2netp"
    assert not {d.model: d for d in bgremoval_downloads()}["birefnet-general"].default  # 1 GB: opt-in


def test_make_models_command_exports_to_the_cache_the_registry_uses(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CACHE_DIR", str(tmp_path / "onnx"))
    assert (
        fetch_models.main(
            ["--dir", str(tmp_path / "m"), "--model", "realesr-animevideov3", "--mirror", str(model_dir), "--export"]
        )
        == 0
    )
    exported = sorted((tmp_path / "onnx").rglob("*.*"))
    assert sorted(p.suffix for p in exported) == [".bin", ".onnx", ".param"]
    mtimes = [p.stat().st_mtime_ns for p in exported]
    for backend in ("onnxruntime", "ncnn"):
        assert registry_for(tmp_path / "m", tmp_path, backend).resolve("realesr-animevideov3").backend == backend
    assert [p.stat().st_mtime_ns for p in exported] == mtimes  # reused, not converted again
    assert fetch_models.main(["--dir", str(tmp_path / "m"), "--model", "u2net", "--mirror", str(model_dir)]) == 1
    shutil.rmtree(tmp_path / "m")


def core_rate(measurement: dict, halo: int) -> float:
    """Output-core pixels per second: what a tile delivers, its halo's share taken out."""
    edge = measurement["tile"]
    return measurement["megapixels_per_second"] * (edge / (edge + 2 * halo)) ** 2


def test_calibration_picks_the_fastest_backend_and_tile_within_45_db(model_dir, tmp_path, caplog):
    directory = only(tmp_path, model_dir, "realesr-animevideov3.pth")
    registry = registry_for(directory, tmp_path, "auto")
    model = registry.resolve("realesr-animevideov3")
    figures = {m["backend"]: m for m in model.calibration}
    expected = {"torch-fp32", "torch-fp32-cl", "onnxruntime", "openvino", "ncnn", "ncnn-bf16"} | (
        {"torch-bf16-cl"} if cpu_has_bf16() else set()
    )
    assert set(figures) == expected
    chosen = [m for m in model.calibration if m["chosen"]]
    assert len(chosen) == 1 and chosen[0]["backend"] == model.backend
    eligible = [m for m in model.calibration if m["eligible"]]
    assert core_rate(chosen[0], registry.halo) == max(core_rate(m, registry.halo) for m in eligible)
    assert all(m["psnr_db"] >= 45 for m in eligible) and figures["torch-fp32"]["psnr_db"] > 100
    # The tile: the first one for every candidate, bigger ones for the fastest few at most.
    first = registry.calibration_tile - 2 * registry.halo
    assert all(m["tile"] in (first, *tile_ladder(first)) for m in model.calibration)
    assert sum(m["tile"] != first for m in model.calibration) <= LADDER_CONTENDERS
    assert model.preferred_tile == chosen[0]["tile"] and model.preferred_tile in model.tile_speeds
    assert model.engine.tile_speeds == model.tile_speeds and first in model.tile_speeds
    assert model.engine.plan(4000, 4000, 4).tile in model.tile_speeds  # a size it was timed at
    # An image the size of the tile with the best speed per input pixel is one such tile: any other has more
    # pixels to run (halos) or runs them slower.
    best = max(model.tile_speeds, key=model.tile_speeds.get)
    assert len(model.engine.plan(best, best - 8, 4).tiles) == 1
    assert model.info()["calibration"] == model.calibration
    assert model.info()["preferred_tile"] == model.preferred_tile

    # A restart on the same machine with the same settings reuses the outcome; other settings measure again.
    with caplog.at_level(logging.INFO, logger="imagemesh.upscaler.models"):
        again = registry_for(directory, tmp_path, "auto").resolve("realesr-animevideov3")
    assert [r.getMessage() for r in caplog.records].count("calibration reused") == 1
    assert (again.backend, again.calibration, again.preferred_tile) == (
        model.backend,
        model.calibration,
        model.preferred_tile,
    )
    assert again.engine.tile_speeds == model.tile_speeds
    records = sorted((tmp_path / "onnx" / "calibration").glob("*.json"))
    assert len(records) == 1
    records[0].write_text("{not json")  # a damaged record is measured again, and rewritten
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imagemesh.upscaler.models"):
        registry_for(directory, tmp_path, "auto", halo=8)
        registry_for(directory, tmp_path, "auto")
    assert "calibration reused" not in [r.getMessage() for r in caplog.records]
    assert len(list((tmp_path / "onnx" / "calibration").glob("*.json"))) == 2
    assert read_record(records[0]) is not None


class Paced(ArrayBackend):
    """A nearest-neighbour 4x "network" that takes a set time for a tile of so many pixels,
    and remembers the tile edges it was given. `burst`: (edge, calls): its first calls at that
    edge take four times as long, as under a passing burst of load from elsewhere."""

    def __init__(self, name, seconds_for_pixels, gain=1.0, burst=(0, 0)):
        self.name, self.seconds_for_pixels, self.gain = name, seconds_for_pixels, gain
        self.edges = set()
        self.burst_edge, self.burst_calls = burst

    def __call__(self, batch, threads=0):
        self.edges.add(batch.shape[2])
        slowdown = 1
        if batch.shape[2] == self.burst_edge and self.burst_calls > 0:
            self.burst_calls, slowdown = self.burst_calls - 1, 4
        time.sleep(slowdown * self.seconds_for_pixels(batch.shape[2] * batch.shape[3]))
        return np.repeat(np.repeat(batch, 4, axis=2), 4, axis=3) * self.gain


def test_calibration_times_the_fastest_on_bigger_tiles_until_they_are_clearly_slower():
    def cache_bound(pixels):  # fastest per pixel at 48x48 (by far more than noise), six times slower past it
        return pixels * (1.2e-5 if pixels <= 32 * 32 else 0.8e-5 if pixels <= 48 * 48 else 6e-5)

    # Faster per pixel at 48 than at 32, 5% slower at 64 (within noise: it goes on), fastest at 96.
    plateau = {32 * 32: 0.020, 48 * 48: 0.036, 64 * 64: 0.067, 96 * 96: 0.115}
    backends = {
        "cache-bound": Paced("cache-bound", cache_bound),
        "plateau": Paced("plateau", plateau.__getitem__),
        # A fixed cost per call (bigger tiles pay a little), caught in a burst at 64.
        "steady": Paced("steady", lambda pixels: 0.005 + 2e-5 * pixels, burst=(64, LADDER_RUNS)),
        "slow": Paced("slow", lambda pixels: 6e-5 * pixels),
        "fast-wrong": Paced("fast-wrong", lambda pixels: 1e-6 * pixels, gain=0.5),
    }
    candidates = [Candidate(name, "torch", lambda backend=backend: backend) for name, backend in backends.items()]
    tile = calibration_tile(32)
    reference = np.repeat(np.repeat(tile, 4, axis=2), 4, axis=3)
    chosen, figures, speeds = calibrate(candidates, reference, tile, runs=2, halo=0, tile_ladder=(48, 64, 96))
    tiles = {f["backend"]: f["tile"] for f in figures}
    assert chosen.name == "cache-bound" and tiles["cache-bound"] == 48
    assert backends["cache-bound"].edges == {32, 48, 64}  # clearly slower at 64: not timed at 96
    assert tiles["plateau"] == 96 and 96 in backends["plateau"].edges  # a dip within noise did not stop it
    assert tiles["steady"] == 96  # a step slowed by a burst is timed again before it gives up
    assert backends["slow"].edges == backends["fast-wrong"].edges == {32}  # not among the fastest eligible
    assert tiles["slow"] == tiles["fast-wrong"] == 32
    assert [f["backend"] for f in figures if f["chosen"]] == ["cache-bound"]
    assert sorted(speeds) == [32, 48, 64] and max(speeds, key=speeds.get) == 48  # the chosen one's, per tile


def test_calibration_refuses_a_fast_but_inaccurate_backend():
    class Fixed(ArrayBackend):
        def __init__(self, name, output, delay):
            self.name, self.output, self.delay = name, output, delay

        def __call__(self, batch, threads=0):
            time.sleep(self.delay)
            return self.output

    tile = calibration_tile(32)
    reference = np.repeat(np.repeat(tile, 4, axis=2), 4, axis=3)
    wrong = Candidate("fast-wrong", "torch", lambda: Fixed("fast-wrong", reference * 0.5, 0.0))
    right = Candidate("slow-right", "torch", lambda: Fixed("slow-right", reference + 1e-4, 0.01))
    chosen, figures, _ = calibrate([wrong, right], reference, tile, runs=2)
    assert chosen.name == "slow-right"
    assert [(f["backend"], f["eligible"], f["chosen"]) for f in figures] == [
        ("fast-wrong", False, False),
        ("slow-right", True, True),
    ]
    # Asked for by name, an inaccurate backend is still served, and said to be inaccurate.
    chosen, figures, speeds = calibrate([wrong], reference, tile, runs=2, tile_ladder=(48,), forced=True)
    assert chosen.name == "fast-wrong" and [(f["eligible"], f["chosen"]) for f in figures] == [(False, True)]
    assert sorted(speeds) == [32, 48]

    # And one that cannot run says why, where calibration among several would skip it.
    def unavailable():
        raise RuntimeError("this backend needs what this machine lacks")

    with pytest.raises(RuntimeError, match="lacks"):
        calibrate([Candidate("broken", "torch", unavailable)], reference, tile, runs=2, forced=True)


def test_a_forced_backend_is_timed_only_to_size_its_tiles(model_dir, tmp_path, caplog):
    directory = only(tmp_path, model_dir, "realesr-animevideov3.pth")

    def forced(tile: int = 0):
        return registry_for(directory, tmp_path, "ncnn", tile=tile).resolve("realesr-animevideov3")

    model = forced()
    [figure] = model.calibration  # the one backend asked for, its accuracy reported
    assert (figure["backend"], figure["chosen"], model.backend) == ("ncnn", True, "ncnn")
    assert figure["psnr_db"] >= 45 and figure["eligible"]
    first = 128 - 2 * 16
    assert first in model.tile_speeds and set(model.tile_speeds) <= {first, *tile_ladder(first)}
    assert model.preferred_tile == figure["tile"] in model.tile_speeds
    assert model.engine.plan(4000, 4000, 4).tile in model.tile_speeds  # sized by speed, not by memory alone
    with caplog.at_level(logging.INFO, logger="imagemesh.upscaler.models"):
        again = forced()
    assert "calibration reused" in [r.getMessage() for r in caplog.records]
    assert (again.calibration, again.engine.tile_speeds) == (model.calibration, model.tile_speeds)
    # UPSCALER_TILE: every request's tile unless it names one, and nothing to time.
    fixed = forced(tile=200)
    assert fixed.calibration == [] and fixed.preferred_tile == 0
    assert fixed.engine.plan(4000, 4000, 4).tile == 200 and fixed.engine.plan(4000, 4000, 4, tile=64).tile == 64
    if not cpu_has_bf16():
        broken = registry_for(model_dir, tmp_path, "torch-bf16-cl").models["realesr-animevideov3"]
        assert not broken.ready and "not available" in broken.reason


def test_with_a_fixed_tile_calibration_times_the_backends_on_it_alone(model_dir, tmp_path):
    directory = only(tmp_path, model_dir, "realesr-animevideov3.pth")
    model = registry_for(directory, tmp_path, "torch", tile=48, halo=8).resolve("realesr-animevideov3")
    assert len(model.calibration) > 1 and {m["tile"] for m in model.calibration} == {48}
    assert model.preferred_tile == 48 and list(model.tile_speeds) == [48]
    assert model.engine.plan(1000, 1000, 4).tile == 48


def test_inference_lanes_give_backends_a_wide_and_a_narrow_form_that_agree(model_dir, tmp_path):
    import threading

    directory = only(tmp_path, model_dir, "realesr-animevideov3.pth")
    tile = calibration_tile(48)
    expected = registry_for(directory, tmp_path, "ncnn").resolve("realesr-animevideov3").engine.model(tile)
    for backend in ("ncnn", "openvino", "onnxruntime"):
        registry = registry_for(directory, tmp_path, backend, lanes=2)
        engine = registry.resolve("realesr-animevideov3").engine
        assert engine.lanes is registry.lanes and engine.model.adapts_threads, backend
        if backend == "openvino":
            assert int(engine.model.compiled[1].get_property("NUM_STREAMS")) == 2
        outputs = [engine.model(tile, threads=2)]
        narrow = [threading.Thread(target=lambda: outputs.append(engine.model(tile, threads=1))) for _ in range(2)]
        for call in narrow:
            call.start()
        for call in narrow:
            call.join()
        assert len(outputs) == 3 and all(psnr(out, expected, 1.0) >= 45 for out in outputs), backend


def test_torch_on_cpu_narrows_a_call_on_its_own_thread_only(model_dir, tmp_path):
    import threading

    directory = only(tmp_path, model_dir, "realesr-animevideov3.pth")
    model = registry_for(directory, tmp_path, "torch-fp32-cl", lanes=2).resolve("realesr-animevideov3").engine.model
    assert model.adapts_threads
    tile = calibration_tile(48)
    wide = model(tile, threads=2)
    narrow: list = []

    def call_narrow():
        narrow.extend([model(tile, threads=1), torch.get_num_threads()])

    caller = threading.Thread(target=call_narrow)
    caller.start()
    caller.join()
    assert narrow[1] == 1 and torch.get_num_threads() == 2  # the narrow call's thread only
    assert psnr(narrow[0], wide, 1.0) >= 45
