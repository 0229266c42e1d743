"""Limits of the contract that the services enforce and the gateway documents
(and checks early): declared here once, read by both."""

MIN_SCALE, MAX_SCALE = 1.0, 8.0  # upscale factor
MIN_TILE_SIZE, MAX_TILE_SIZE = 16, 2048  # inference tile edge; 0 means automatic
MAX_TILE_HALO = 256
MAX_STEPS = 16  # steps of one pipeline
MAX_KEYER_TOLERANCE = 255  # the keyer's colour distance; 0 means its default
MAX_TILES_PER_IMAGE = 65536  # cells of one image's grid: work and memory per pixel stay bounded
MIN_TILE_EDGE = 16  # a grid cell's edge, unless the image itself is narrower

# A faster inference backend is chosen only if its output stays this close (PSNR) to the exact one.
MIN_BACKEND_PSNR_DB = 45.0


def output_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The size an upscale by `scale` makes (the web page's app.js rounds the same way)."""
    return max(1, round(width * scale)), max(1, round(height * scale))
