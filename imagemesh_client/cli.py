"""imagemesh: the command line.

    imagemesh upscale in.jpg -s 4 -o out.png
    imagemesh upscale photos/*.jpg -s 4 -o out/      (several files, globs or folders: a batch)
    imagemesh remove-bg photo.jpg -o cutout.png [-m MODEL | --models a,b]
    imagemesh effect photo.jpg blackwhite -p grain_strength=0.1 -o bw.jpg
    imagemesh process photo.jpg --steps '[{"op": "upscale", "scale": 2}]' -o out.png
    imagemesh models | effects

Over REST by default (--url, $IMAGEMESH_URL; --token, $IMAGEMESH_TOKEN), or
straight over gRPC with --grpc. Long work shows a progress bar on stderr.
A batch runs its files as jobs, --jobs at a time, keeps going past a file that
fails, prints a summary, and exits with the first failure's code.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
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
# What a folder given as input contributes to a batch.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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


def time_left(view: dict) -> str:
    eta = view.get("eta_seconds")
    if eta is None or view.get("status") != "running":
        return ""
    return f", about {eta:.0f} s left" if eta >= 1 else ", under a second left"


class ProgressBar:
    """One file's bar: tiles as they arrive, and the job's fraction and time left (REST)."""

    def __init__(self, quiet: bool, stream=sys.stderr, width: int = 30):
        self.quiet, self.stream, self.width, self.shown = quiet, stream, width, False
        self.done = self.total = 0
        self.fraction, self.left = 0.0, ""

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self.fraction = max(self.fraction, done / total if total else 0.0)
        self._draw()

    def status(self, view: dict) -> None:
        self.fraction, self.left = max(self.fraction, view["progress"]["fraction"]), time_left(view)
        self._draw()

    def _draw(self) -> None:
        if self.quiet:
            return
        filled = round(self.width * self.fraction)
        tiles = f"{self.done}/{self.total} tiles" if self.total else "? tiles"
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {tiles}, {self.fraction:.0%}{self.left}".ljust(80)
        )
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")


class BatchProgress:
    """One status line for a batch: files done and failed, and each running file's share and time left."""

    def __init__(self, inputs: list[Path], quiet: bool, stream=sys.stderr, width: int = 20):
        self.quiet, self.stream, self.width = quiet, stream, width
        self.total, self.done, self.failed = len(inputs), 0, 0
        self.running: dict[Path, str] = {}
        self.lock = threading.Lock()

    def start(self, path: Path) -> FileProgress:
        self._set(path, "starting")
        return FileProgress(self, path)

    def _set(self, path: Path, state: str) -> None:
        with self.lock:
            self.running[path] = state
        self._show()

    def end(self, path: Path, ok: bool) -> None:
        with self.lock:
            self.running.pop(path, None)
            self.done += ok
            self.failed += not ok
        self._show()

    def _show(self) -> None:
        if self.quiet:
            return
        with self.lock:
            finished = self.done + self.failed
            filled = round(self.width * finished / self.total)
            line = (
                f"[{'#' * filled}{'.' * (self.width - filled)}] {finished}/{self.total} files, "
                f"{self.failed} failed; " + ", ".join(f"{p.name} {state}" for p, state in self.running.items())
            )
            columns = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r" + line[: columns - 1].ljust(columns - 1))
            self.stream.flush()

    def finish(self) -> None:
        if not self.quiet:
            self.stream.write("\n")


class FileProgress:
    """A batch file's part of the status line."""

    def __init__(self, batch: BatchProgress, path: Path):
        self.batch, self.path = batch, path

    def __call__(self, done: int, total: int) -> None:
        self.batch._set(self.path, f"{done}/{total} tiles" if total else "working")

    def status(self, view: dict) -> None:
        self.batch._set(self.path, f"{view['progress']['fraction']:.0%}{time_left(view)}")


def parse_params(pairs: list[str]) -> dict[str, float | str]:
    """Numbers for parameters, text for an effect's named options."""
    params: dict[str, float | str] = {}
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
    parser = argparse.ArgumentParser(
        prog="imagemesh", description=__doc__, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("IMAGEMESH_URL", "http://127.0.0.1:8080"),
        help="the gateway (default $IMAGEMESH_URL or http://127.0.0.1:8080)",
    )
    parser.add_argument("--token", default=os.environ.get("IMAGEMESH_TOKEN"), help="bearer token ($IMAGEMESH_TOKEN)")
    parser.add_argument("--grpc", action="store_true", help="talk to the services over gRPC, not the gateway")
    for service in SERVICES:
        parser.add_argument(
            f"--{service.name}", default=os.environ.get(service.address_setting.upper(), service.default_address)
        )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    commands = parser.add_subparsers(dest="command", required=True)

    def image_command(name, help_text):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("input", type=str, nargs="+", help="an image; several, a glob or a folder make a batch")
        command.add_argument(
            "-o", "--output", type=Path, help="output file (its extension picks the format); for a batch, a folder"
        )
        command.add_argument("-j", "--jobs", type=int, default=2, help="files of a batch processed at once")
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
        step = {
            "op": "remove_background",
            "model": args.model,
            "refine": args.refine,
            "post_process": args.post_process,
            "only_mask": args.only_mask,
            "alpha_matting": args.alpha_matting,
        }
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


def expand_inputs(arguments: list[str]) -> tuple[list[Path], bool]:
    """The files named, globbed or inside named folders, in order, each once; and
    whether this is a batch (several files, a glob or a folder)."""
    files: list[Path] = []
    batch = len(arguments) > 1
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            batch = True
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif not path.exists() and glob.has_magic(argument):
            batch = True
            files += sorted(Path(p) for p in glob.glob(argument) if Path(p).is_file())
        else:
            files.append(path)  # a missing file fails as that file, in its turn
    return list(dict.fromkeys(files)), batch


def output_path(args, source: Path, result: Result, suffix: str = "", batch: bool = False) -> Path:
    if batch:
        folder = args.output or source.parent
        name = source.stem if args.output else f"{source.stem}.{args.command}"
        return folder / f"{name}{suffix}.{result.extension}"
    if args.output and not suffix:
        return args.output
    base = args.output or source.with_name(f"{source.stem}.{args.command}")
    return base.with_name(f"{base.stem}{suffix}.{result.extension}")


def list_models_or_effects(args) -> int:
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


class FileFailed(Exception):
    """One file could not be done: the message, and the exit code it stands for."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def convert(
    args, source: Path, fmt: str, progress: ProgressBar | FileProgress, batch: bool
) -> list[tuple[Path, Result]]:
    """One input file through the command; its outputs, written."""
    try:
        image = source.read_bytes()
    except OSError as exc:
        raise FileFailed(f"cannot read {source}: {exc.strerror}", 3) from None
    try:
        if args.command == "remove-bg" and args.models:
            with Client(args.url, args.token) as client:
                answer = client.candidates(
                    image, [m.strip() for m in args.models.split(",")], fmt if fmt != "auto" else "png"
                )
            print(f"{source}: request_id {answer['request_id']}", file=sys.stderr)
            outputs = []
            for candidate in answer["candidates"]:
                result = Result(base64.b64decode(candidate["image_base64"]), f"image/{candidate['format']}")
                outputs.append((output_path(args, source, result, f".{candidate['model']}", batch), result))
        else:
            steps = steps_for(args)
            if args.grpc:
                result = GrpcClient(args.upscaler, args.bgremoval, args.effects).process(image, steps, fmt, progress)
            else:
                with Client(args.url, args.token) as client:
                    result = client.run_job(image, steps, fmt, progress, progress.status)
            outputs = [(output_path(args, source, result, batch=batch), result)]
    except ImagemeshError as error:
        raise FileFailed(str(error), exit_code(error)) from None
    for path, result in outputs:
        try:
            path.write_bytes(result.data)
        except OSError as exc:
            raise FileFailed(f"cannot write {path}: {exc.strerror}", 3) from None
    return outputs


def describe(path: Path, result: Result) -> str:
    summary = ", ".join(f"{s['op']} {s['name']} ({s['backend']})" for s in result.steps)
    return f"{path}" + (f": {summary}" if summary else "")


def run(args) -> int:
    if args.command in ("models", "effects"):
        return list_models_or_effects(args)
    inputs, batch = expand_inputs(args.input)
    if not inputs:
        print(f"imagemesh: no image files in {' '.join(args.input)}", file=sys.stderr)
        return 3
    if args.jobs < 1:
        raise SystemExit("imagemesh: --jobs must be at least 1")
    fmt = args.format or (FORMATS.get(args.output.suffix.lower(), "auto") if args.output and not batch else "auto")
    if not batch:
        bar = ProgressBar(args.quiet)
        try:
            outputs = convert(args, inputs[0], fmt, bar, batch=False)
        except FileFailed as failure:
            bar.finish()
            print(f"imagemesh: {failure}", file=sys.stderr)
            return failure.code
        bar.finish()
        for path, result in outputs:
            print(describe(path, result), file=sys.stderr)
        return 0
    return run_batch(args, inputs, fmt)


def run_batch(args, inputs: list[Path], fmt: str) -> int:
    if args.output:
        try:
            args.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"imagemesh: cannot make the folder {args.output}: {exc.strerror}", file=sys.stderr)
            return 3
    progress = BatchProgress(inputs, args.quiet)
    outcomes: dict[Path, list[tuple[Path, Result]] | FileFailed] = {}

    def one(source: Path) -> None:
        try:
            outcomes[source] = convert(args, source, fmt, progress.start(source), batch=True)
        except FileFailed as failure:
            outcomes[source] = failure
        progress.end(source, not isinstance(outcomes[source], FileFailed))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, inputs))
    progress.finish()
    failures = [outcome for source in inputs if isinstance(outcome := outcomes[source], FileFailed)]
    for source in inputs:
        outcome = outcomes[source]
        if isinstance(outcome, FileFailed):
            print(f"failed  {source}: {outcome}", file=sys.stderr)
        else:
            for path, result in outcome:
                print(f"done    {source} -> {describe(path, result)}", file=sys.stderr)
    print(f"{len(inputs) - len(failures)} done, {len(failures)} failed, of {len(inputs)} files", file=sys.stderr)
    return failures[0].code if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
