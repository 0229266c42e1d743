"""imagemesh: the command line.

    imagemesh upscale in.jpg -s 4 -o out.png
    imagemesh remove-bg photo.jpg -o cutout.png [-m MODEL | --models a,b]
    imagemesh effect photo.jpg blackwhite -p grain_strength=0.1 -o bw.jpg
    imagemesh process photo.jpg --steps '[{"op": "upscale", "scale": 2}]' -o out.png
    imagemesh models | effects

Over REST by default (--url, $IMAGEMESH_URL; --token, $IMAGEMESH_TOKEN), or
straight over gRPC with --grpc. Long work shows a progress bar on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.common.topology import SERVICES

from . import Client, GrpcClient, ImagemeshError, Result

EXIT_CODES = """exit codes:
  0  success
  2  bad command line
  3  the input cannot be read or the output cannot be written
  4  the request was refused (a 4xx: bad parameter, unknown model, not an image, too large)
  5  authentication failed (401)
  6  busy or not ready: retry later (429, 503)
  7  the server failed (other 5xx)
  8  the server cannot be reached"""

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def exit_code(error: ImagemeshError) -> int:
    if error.status == 0:
        return 8
    if error.status == 401:
        return 5
    if error.status in (429, 503):
        return 6
    if 400 <= error.status < 500:
        return 4
    return 7


class ProgressBar:
    def __init__(self, quiet: bool, stream=sys.stderr, width: int = 30):
        self.quiet, self.stream, self.width, self.shown = quiet, stream, width, False

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or not total:
            return
        filled = round(self.width * done / total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} tiles")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")


def parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"imagemesh: -p takes name=value, got {pair!r}")
        try:
            params[key] = float(value)
        except ValueError:
            params[key] = value
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagemesh", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("IMAGEMESH_URL", "http://127.0.0.1:8080"),
                        help="the gateway (default $IMAGEMESH_URL or http://127.0.0.1:8080)")
    parser.add_argument("--token", default=os.environ.get("IMAGEMESH_TOKEN"), help="bearer token ($IMAGEMESH_TOKEN)")
    parser.add_argument("--grpc", action="store_true", help="talk to the services over gRPC, not the gateway")
    for service in SERVICES:
        parser.add_argument(f"--{service.name}", default=os.environ.get(service.address_setting.upper(),
                                                                        service.default_address))
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    commands = parser.add_subparsers(dest="command", required=True)

    def image_command(name, help_text):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("input", type=Path)
        command.add_argument("-o", "--output", type=Path, help="output file (its extension picks the format)")
        command.add_argument("-f", "--format", choices=("auto", "png", "jpeg", "webp"), help="output format")
        return command

    up = image_command("upscale", "upscale an image")
    up.add_argument("-s", "--scale", type=float, default=4)
    up.add_argument("-m", "--model", default="auto")
    bg = image_command("remove-bg", "remove the background")
    bg.add_argument("-m", "--model", default="auto")
    bg.add_argument("--models", help="several models, comma-separated: writes one file per model")
    for flag in ("refine", "post-process", "only-mask", "alpha-matting"):
        bg.add_argument(f"--{flag}", action="store_true")
    bg.add_argument("--bgcolor")
    fx = image_command("effect", "apply an effect")
    fx.add_argument("effect")
    fx.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE")
    pr = image_command("process", "run a pipeline of steps")
    pr.add_argument("--steps", required=True, help="a JSON list of steps, or @file.json")
    commands.add_parser("models", help="list the models of every service")
    commands.add_parser("effects", help="list the effects and their parameters")
    return parser


def steps_for(args) -> list[dict]:
    if args.command == "upscale":
        return [{"op": "upscale", "scale": args.scale, "model": args.model}]
    if args.command == "remove-bg":
        step = {"op": "remove_background", "model": args.model, "refine": args.refine,
                "post_process": args.post_process, "only_mask": args.only_mask, "alpha_matting": args.alpha_matting}
        if args.bgcolor:
            step["bgcolor"] = args.bgcolor
        return [step]
    if args.command == "effect":
        return [{"op": "effect", "effect": args.effect, "params": parse_params(args.param)}]
    text = Path(args.steps[1:]).read_text() if args.steps.startswith("@") else args.steps
    try:
        steps = json.loads(text)
    except ValueError:
        raise SystemExit("imagemesh: --steps is not valid JSON") from None
    return steps


def output_path(args, result: Result, suffix: str = "") -> Path:
    if args.output and not suffix:
        return args.output
    base = args.output or args.input.with_name(f"{args.input.stem}.{args.command}")
    return base.with_name(f"{base.stem}{suffix}.{result.extension}")


def run(args) -> int:
    if args.command in ("models", "effects"):
        with Client(args.url, args.token) as client:
            listing = client.models() if args.command == "models" else client.effects()
        if args.command == "models":
            for m in listing["models"]:
                state = "ready" if m["ready"] else f"not ready: {m['not_ready_reason']}"
                print(f"{m['service']:10} {m['name']:28} {m.get('backend') or '-':12} {state}")
        else:
            for e in listing["effects"]:
                params = ", ".join(f"{p['name']}={p['default']:g}" for p in e.get("params", []))
                print(f"{e['name']:12} {e['description']}" + (f"\n             {params}" if params else ""))
        return 0
    try:
        image = args.input.read_bytes()
    except OSError as exc:
        print(f"imagemesh: cannot read {args.input}: {exc.strerror}", file=sys.stderr)
        return 3
    fmt = args.format or (FORMATS.get(args.output.suffix.lower(), "auto") if args.output else "auto")
    bar = ProgressBar(args.quiet)
    try:
        if args.command == "remove-bg" and args.models:
            with Client(args.url, args.token) as client:
                answer = client.candidates(image, [m.strip() for m in args.models.split(",")],
                                           fmt if fmt != "auto" else "png")
            import base64
            for candidate in answer["candidates"]:
                result = Result(base64.b64decode(candidate["image_base64"]), f"image/{candidate['format']}")
                write(output_path(args, result, f".{candidate['model']}"), result)
            print(f"request_id {answer['request_id']}", file=sys.stderr)
            return 0
        steps = steps_for(args)
        if args.grpc:
            result = GrpcClient(args.upscaler, args.bgremoval, args.effects).process(image, steps, fmt, bar)
        else:
            with Client(args.url, args.token) as client:
                result = client.run_job(image, steps, fmt, bar)
    except ImagemeshError as error:
        bar.finish()
        print(f"imagemesh: {error}", file=sys.stderr)
        return exit_code(error)
    bar.finish()
    return write(output_path(args, result), result)


def write(path: Path, result: Result) -> int:
    try:
        path.write_bytes(result.data)
    except OSError as exc:
        print(f"imagemesh: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 3
    summary = ", ".join(f"{s['op']} {s['name']} ({s['backend']})" for s in result.steps)
    print(f"{path}" + (f": {summary}" if summary else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
