"""Clients of the mesh as others write them, and a web server for image_url inputs."""

import json
import shutil
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import httpx
import numpy as np
from imagemesh.v1 import pipeline_pb2

from services.common import wire
from support.images import png

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def effects_stream(channel: grpc.Channel):
    """The effects service's streaming call on a channel, as any gRPC client makes it."""
    return channel.stream_stream(
        "/imagemesh.v1.Effects/ApplyEffects",
        request_serializer=pipeline_pb2.StreamRequest.SerializeToString,
        response_deserializer=pipeline_pb2.StreamResponse.FromString,
    )


def collect(replies):
    result, summary, tiles, out = None, None, [], None
    for reply in replies:
        part = reply.WhichOneof("part")
        if part == "result":
            result = reply.result
            info = wire.HeaderInfo(result.image, 1 << 40)
            out = np.zeros((info.height, info.width, info.channels), info.dtype)
        elif part == "tile":
            tiles.append(reply.tile)
            rect, pixels = wire.tile_pixels(reply.tile, info)
            out[rect.y0 : rect.y1, rect.x0 : rect.x1] = pixels
        else:
            summary = reply.summary
    return result, summary, tiles, out


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    seen, event = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                seen.append((event, json.loads(line[6:])))
    return seen


def png_bytes(width=32, height=24) -> bytes:
    return png(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


class ImageServer(BaseHTTPRequestHandler):
    """A loopback web server for image_url tests."""

    def do_GET(self):
        routes = {
            "/photo.png": (200, {"Content-Type": "image/png"}, png_bytes()),
            "/text": (200, {"Content-Type": "text/plain"}, b"not an image at all"),
            "/big.png": (200, {"Content-Type": "image/png"}, png_bytes(400, 400)),
            "/missing": (404, {}, b""),
            "/redirect-here": (302, {"Location": "/photo.png"}, b""),
            "/redirect-elsewhere": (302, {"Location": f"http://127.0.0.2:{self.server.server_port}/photo.png"}, b""),
        }
        if self.path.startswith("/loop/"):
            status, headers, body = 302, {"Location": f"/loop/{int(self.path[6:]) + 1}"}, b""
        else:
            status, headers, body = routes.get(self.path, (404, {}, b""))
        self.server.hits.append(self.path)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
