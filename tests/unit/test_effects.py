import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.effects import engine, registry
from services.effects.server import EffectsOp


def chain_of(specs, image, mode="RGB"):
    steps = []
    for name, params, options in specs:
        effect = registry.get(name)
        resolved, chosen = effect.resolve(params, options)
        steps.append(engine.ChainStep(effect, resolved, chosen))
    return engine.Chain(steps, image.shape[1], image.shape[0], mode, image.dtype)


def run(chain, image, tile):
    """Render through the streamed op, tile by tile (as the service does)."""
    op = EffectsOp(chain, tile)
    out = np.zeros((op.out_height, op.out_width, len(op.out_mode)), op.out_dtype)
    if op.whole_image:
        op.prepare(image)
    for job in op.jobs:
        context = job if op.whole_image else op.context_rect(job)
        pixels = image if op.whole_image else image[context.y0 : context.y1, context.x0 : context.x1]
        out[job.y0 : job.y1, job.x0 : job.x1] = op.render(job, pixels)
    return out


@pytest.mark.parametrize("name", list(registry.EFFECTS))
def test_tiled_equals_untiled_bit_for_bit(name, photo):
    chain = chain_of([(name, {}, {})], photo)
    whole = run(chain, photo, 4096)
    for tile in (23, 64):
        assert np.array_equal(run(chain, photo, tile), whole), (name, tile)


def test_chains_rgba_and_16bit_tile_exactly(photo):
    alpha = np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None].repeat(photo.shape[0], 0)
    rgba = np.dstack([photo, alpha])
    specs = [("blackwhite", {"grain_strength": 0.2}, {}), ("sharpen", {}, {}), ("vignette", {}, {})]
    chain = chain_of(specs, rgba, "RGBA")
    assert chain.out_mode == "LA"
    out = run(chain, rgba, 4096)
    assert np.array_equal(run(chain, rgba, 19), out)
    assert np.array_equal(out[:, :, 1], alpha)  # alpha passes through untouched
    sixteen = photo.astype(np.uint16) * 257 + 3
    chain16 = chain_of([("blur", {"radius": 3}, {}), ("pixelate", {"block": 5}, {})], sixteen)
    out16 = run(chain16, sixteen, 4096)
    assert out16.dtype == np.uint16 and np.array_equal(run(chain16, sixteen, 31), out16)


def test_blackwhite_defaults_are_the_film_look_users_know():
    defaults = {p.name: p.default for p in registry.EFFECTS["blackwhite"].params}
    assert {
        k: defaults[k]
        for k in ("gamma_correction", "contrast_boost", "edge_strength", "halation_strength", "grain_strength")
    } == {
        "gamma_correction": 1.02,
        "contrast_boost": 1.12,
        "edge_strength": 0.9,
        "halation_strength": 0.12,
        "grain_strength": 0.08,
    }


def test_grain_is_seeded_by_position_not_by_tile():
    whole = engine.position_noise(engine.Origin(0, 0, 100, 100), 50, 60, seed=7)
    part = engine.position_noise(engine.Origin(13, 21, 100, 100), 10, 12, seed=7)
    assert np.array_equal(part, whole[21:31, 13:25])
    assert not np.array_equal(whole, engine.position_noise(engine.Origin(0, 0, 100, 100), 50, 60, seed=8))
    assert -1 <= whole.min() < -0.5 and 0.5 < whole.max() <= 1 and abs(whole.mean()) < 0.05


@pytest.mark.parametrize(
    "options, params, palette",
    [
        ({"palette": "bw"}, {}, {0, 255}),
        ({"palette": "grey"}, {"levels": 4}, {0, 85, 170, 255}),
        ({"palette": "bw"}, {"dot_spacing": 3}, {0, 255}),
    ],
)
def test_floyd_steinberg_uses_only_its_palette_and_keeps_brightness(photo, options, params, palette):
    chain = chain_of([("dither", params, options)], photo)
    out = run(chain, photo, 64)
    assert chain.out_mode == "L" and set(np.unique(out)) <= palette
    source = (photo.astype(np.float64) @ [0.299, 0.587, 0.114]).mean()  # Pillow's L conversion
    assert abs(out.mean() - source) / 255 < 0.03


def test_rgb_dither_palette(photo):
    out = run(chain_of([("dither", {"levels": 2}, {"palette": "rgb"})], photo), photo, 64)
    assert out.shape[2] == 3 and set(np.unique(out)) <= {0, 255}


def test_pixel8bit_and_popart_use_their_palettes(photo):
    out = run(chain_of([("pixel8bit", {"block": 4}, {"palette": "gameboy"})], photo), photo, 37)
    gameboy = {tuple(c) for c in np.rint(engine.PIXEL_PALETTES["gameboy"] * 255).astype(int)}
    assert {tuple(c) for c in out.reshape(-1, 3)} <= gameboy
    grid = run(chain_of([("popart", {"levels": 4}, {"grid": "2x2"})], photo), photo, 64)
    assert grid.shape == (2 * photo.shape[0], 2 * photo.shape[1], 3)
    quadrant = grid[: photo.shape[0], : photo.shape[1]]
    colours = {tuple(c) for c in quadrant.reshape(-1, 3)}
    assert len(colours) <= 4 and not np.array_equal(quadrant, grid[photo.shape[0] :, photo.shape[1] :])


@pytest.mark.parametrize(
    "name, params, options, message",
    [
        ("nope", {}, {}, "valid effects: blackwhite"),
        ("blackwhite", {"grain": 1}, {}, "valid parameters: gamma_correction"),
        ("blackwhite", {"grain_strength": 5}, {}, "between 0 and 1"),
        ("pixel8bit", {"block": 2.5}, {}, "whole number"),
        ("pixel8bit", {}, {"palette": "atari"}, "one of pico8"),
        ("sepia", {}, {"tone": "warm"}, "valid options: none"),
    ],
)
def test_parameters_are_validated_naming_the_valid_ones(name, params, options, message):
    with pytest.raises(InvalidArgument, match=message):
        registry.get(name).resolve(params, options)
