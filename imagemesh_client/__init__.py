"""A small client for imagemesh: over REST (the gateway) or straight over gRPC.

from imagemesh_client import Client
client = Client("http://127.0.0.1:8080", token=None)
result = client.upscale(open("in.jpg", "rb").read(), scale=4)
open("out.png", "wb").write(result.data)
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Callable

import httpx

Progress = Callable[[int, int], None]


class ImagemeshError(Exception):
    """An answer that is not a success: HTTP status (0 when unreachable), code, message."""

    def __init__(self, status: int, code: str, message: str, request_id: str = ""):
        super().__init__(f"{code}: {message}" + (f" (request id {request_id})" if request_id else ""))
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


@dataclass
class Result:
    data: bytes
    media_type: str
    steps: list[dict] = field(default_factory=list)
    width: int = 0
    height: int = 0

    @property
    def extension(self) -> str:
        return {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(self.media_type, "png")


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise ImagemeshError(
            response.status_code, error.get("code", ""), error.get("message", ""), error.get("request_id", "")
        )
    except (ValueError, KeyError, TypeError):
        raise ImagemeshError(response.status_code, "http_error", response.text[:300]) from None


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None, timeout: float = 600):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ImagemeshError(0, "unreachable", f"cannot reach {self.http.base_url}: {exc}") from None
        _raise_for(response)
        return response

    def models(self) -> dict:
        return self._request("GET", "/v1/models").json()

    def effects(self) -> dict:
        return self._request("GET", "/v1/effects").json()

    def _image(self, path: str, image: bytes, fields: dict) -> Result:
        response = self._request(
            "POST",
            path,
            files={"file": ("image", image)},
            data={k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()},
            headers={"Accept": "application/json"},
        )
        body = response.json()
        return Result(
            base64.b64decode(body["image_base64"]),
            f"image/{body['format']}",
            body.get("steps", []),
            body["width"],
            body["height"],
        )

    def upscale(self, image: bytes, scale: float = 4, model: str = "auto", format: str = "auto") -> Result:
        return self._image("/v1/upscale", image, {"scale": str(scale), "model": model, "format": format})

    def remove_background(self, image: bytes, model: str = "auto", format: str = "auto", **options) -> Result:
        return self._image(
            "/v1/remove-background",
            image,
            {"model": model, "format": format, **{k: str(v).lower() for k, v in options.items()}},
        )

    def candidates(self, image: bytes, models: list[str], format: str = "png") -> dict:
        return self._request(
            "POST",
            "/v1/remove-background",
            files={"file": ("image", image)},
            data={"models": ",".join(models), "format": format},
        ).json()

    def choose(self, request_id: str, model: str) -> dict:
        return self._request(
            "POST", "/v1/remove-background/choice", json={"request_id": request_id, "model": model}
        ).json()

    def effect(self, image: bytes, effect: str, params: dict | None = None, format: str = "auto") -> Result:
        return self._image("/v1/effects", image, {"effect": effect, "params": params or {}, "format": format})

    def process(self, image: bytes, steps: list[dict], format: str = "auto") -> Result:
        return self._image("/v1/process", image, {"steps": steps, "format": format})

    # --- jobs: the same pipelines, with progress ------------------------------

    def submit_job(self, image: bytes, steps: list[dict], format: str = "auto") -> dict:
        return self._request(
            "POST", "/v1/jobs", files={"file": ("image", image)}, data={"steps": json.dumps(steps), "format": format}
        ).json()

    def follow_job(
        self, job_id: str, progress: Progress | None = None, on_status: Callable[[dict], None] | None = None
    ) -> dict:
        """Follow the job's events until it ends; returns its final status. `progress` gets
        (tiles done, tiles total), `on_status` the whole status (fraction, eta_seconds)."""
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                event = None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        view = json.loads(line[6:])
                        if progress:
                            progress(view["progress"]["tiles_done"], view["progress"]["tiles_total"])
                        if on_status:
                            on_status(view)
                        if event in ("done", "failed"):
                            return view
        except httpx.TransportError as exc:
            raise ImagemeshError(0, "unreachable", f"lost the connection: {exc}") from None
        raise ImagemeshError(502, "incomplete", "the job's event stream ended early")

    def run_job(
        self,
        image: bytes,
        steps: list[dict],
        format: str = "auto",
        progress: Progress | None = None,
        on_status: Callable[[dict], None] | None = None,
    ) -> Result:
        job = self.submit_job(image, steps, format)
        final = self.follow_job(job["id"], progress, on_status)
        if final["status"] != "done":
            error = final.get("error") or {}
            raise ImagemeshError(
                error.get("status", 500), error.get("code", "job_failed"), error.get("message", "the job failed")
            )
        response = self._request("GET", f"/v1/jobs/{job['id']}/result")
        return Result(response.content, response.headers["content-type"], final["steps"])


class GrpcClient:
    """Straight to the services over gRPC, no gateway: the image is decoded and
    encoded here and streamed as tiles to the first step's service."""

    def __init__(
        self,
        upscaler: str | None = None,
        bgremoval: str | None = None,
        effects: str | None = None,
        timeout: float = 600,
    ):
        """Each service's address (host:port, a list, or a name with several addresses);
        None: its default on this machine."""
        from services.common.topology import BY_NAME

        given = {"upscaler": upscaler, "bgremoval": bgremoval, "effects": effects}
        self.addresses = {name: address or BY_NAME[name].default_address for name, address in given.items()}
        self.timeout = timeout

    def process(
        self,
        image: bytes,
        steps: list[dict],
        format: str = "auto",
        progress: Progress | None = None,
        max_pixels: int = 40_000_000,
    ) -> Result:
        import asyncio

        from services.common import imageio, wire
        from services.common.errors import ServiceError
        from services.common.failures import HttpError, from_service_error
        from services.common.fields import Fields
        from services.common.mesh import MeshClient
        from services.common.steps import parse_steps

        async def run() -> Result:
            mesh = MeshClient(self.addresses, self.timeout)
            try:
                decoded = imageio.decode(image, max_bytes=len(image) or 1, max_pixels=max_pixels)

                async def report(done: int, total: int) -> None:
                    if progress:
                        progress(done, total)

                result = await mesh.process(decoded, parse_steps(Fields({"steps": steps})), report)
                fmt = imageio.choose_format(format, decoded.format, result.mode in ("LA", "RGBA"))
                data = imageio.encode(result.pixels, result.mode, fmt, icc_profile=result.icc_profile)
                height, width = result.pixels.shape[:2]
                return Result(data, imageio.MEDIA_TYPES[fmt], [wire.as_json(r) for r in result.reports], width, height)
            except ServiceError as exc:
                error = from_service_error(exc)
                raise ImagemeshError(error.status, error.reason, error.message) from None
            except HttpError as exc:
                raise ImagemeshError(exc.status, exc.reason, exc.message) from None
            finally:
                await mesh.close()

        return asyncio.run(run())
