"""The ``meddl`` command: the one engine behind the Slicer panels, the console and batch runs.

``main(argv) -> int`` is callable from tests. Exit 0 on success; on bad input or usage exit 2
with ONE line on stderr starting ``error:`` (``--debug`` shows the traceback). Progress goes to
stderr as a tqdm bar (``--progress bar``) or to stdout as one JSON object per line
(``--progress json``), which the Slicer modules read from a background process.

Each capability lives in ``meddl/<capability>/cli.py`` with ``configure(subparsers)`` and
``run(args, ctx) -> int``. A capability that is not part of this build still parses and checks
its inputs, then answers ``error: ... not available`` with exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import Cancelled, InputError, MedDLError, NotAvailableError
from .progress import Reporter, bar_progress, json_progress

__all__ = ["main", "RunContext", "Parser", "build_parser", "check_outputs", "common_options", "load_input",
           "make_context", "capability_module", "CAPABILITIES"]

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(MedDLError):
    """Bad command-line usage (argparse's complaints, reworded as one line)."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, unless the help already names it or there is none
    to show (no value, a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (text and action.option_strings and "default" not in text.lower() and default is not None
                and default is not argparse.SUPPRESS and not isinstance(default, bool) and default != []):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (a UsageError), never a multi-line usage dump,
    shows defaults in ``--help`` and plain text for reStructuredText's ````literals```` of docstrings."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = kwargs["description"].replace("``", "")
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


@dataclass
class RunContext:
    """What a capability's ``run(args, ctx)`` gets besides its arguments."""

    reporter: Reporter
    device: Any  # torch.device
    device_reason: str
    seed: int | None
    progress_mode: str
    stdout: Any = field(default_factory=lambda: sys.stdout)
    started: float = field(default_factory=time.perf_counter)

    def log(self, message: str) -> None:
        """A human line on stdout (a JSON object in --progress json mode, so stdout stays parseable)."""
        if self.progress_mode == "json":
            self.stdout.write(json.dumps({"message": message}) + "\n")
        else:
            self.stdout.write(message + "\n")
        self.stdout.flush()

    def summary(self, what: str, **facts: Any) -> None:
        """The closing line: what was done, time and device (and any facts given)."""
        seconds = time.perf_counter() - self.started
        parts = [what] + [f"{k}={v}" for k, v in facts.items()] + [f"time={seconds:.1f}s", f"device={self.device}"]
        if self.progress_mode == "json":
            self.stdout.write(json.dumps({"summary": what, **facts, "seconds": round(seconds, 3),
                                          "device": str(self.device)}) + "\n")
            self.stdout.flush()
        else:
            self.log(" ".join(parts))


# -- common options ---------------------------------------------------------------------------


def _seed(text: str) -> int:
    """A ``--seed`` value: an integer numpy and torch both accept (0 to 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected 0 to {2**32 - 1}, got {value}")
    return value


def common_options(compute: bool = True) -> argparse.ArgumentParser:
    """The parent parser every subcommand uses: --device/--progress/--seed (compute) and --debug."""
    p = Parser(add_help=False)
    if compute:
        p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
        p.add_argument("--progress", choices=("bar", "json", "none"), default=None,
                       help="progress display: a bar on stderr, JSON lines on stdout, or nothing "
                            "(default: bar on a terminal, else none)")
        p.add_argument("--seed", type=_seed, default=None, help="random seed for reproducible results (0 to 2^32 - 1)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def check_outputs(outputs: Sequence[str | os.PathLike | None], inputs: Sequence[str | os.PathLike | None]) -> None:
    """Refuse outputs that would overwrite an input (or a file of one: a header's data file, the
    other half of a pair), or that repeat each other."""
    from .io import files_of

    ins = {Path(p).resolve() for p in inputs if p}
    parts = {f.resolve(): p for p in inputs if p for f in files_of(p)[1:]}
    seen: set[Path] = set()
    for out in outputs:
        if not out:
            continue
        target = Path(out).resolve()
        if target in ins:
            raise InputError(f"output '{out}' is also an input; choose another output path (inputs are never overwritten)")
        if target in parts:
            raise InputError(f"output '{out}' is a file of input '{parts[target]}'; choose another output path "
                             "(inputs are never overwritten)")
        for f in files_of(out, written=True)[1:]:
            if f.resolve() in ins or f.resolve() in parts:
                what = f"a file of input '{parts[f.resolve()]}'" if f.resolve() in parts else "an input"
                raise InputError(f"output '{out}' would overwrite '{f}', {what}; choose another output path "
                                 "(inputs are never overwritten)")
        if target in seen:
            raise InputError(f"output '{out}' is given twice; each output needs its own path")
        if target.exists() and target.is_dir():
            raise InputError(f"output '{out}' is a folder; expected a file path")
        seen.add(target)


def check_output_format(path: str | os.PathLike | None, flag: str, ndim: int = 3, floating: bool = False) -> None:
    """Refuse, before any work, an output path whose format cannot hold the result: unknown, 2D-only
    for a 3D volume, integer-only for floating-point values."""
    from .io import _RGB_SUFFIXES, INTEGER_ONLY_SUFFIXES, VOLUME_SUFFIXES  # io.write's own rules

    if not path:
        return
    name = Path(path).name.lower()
    what = f"a {ndim}D volume" if not floating else f"a {ndim}D floating-point volume"
    if (not name.endswith(VOLUME_SUFFIXES) or (ndim == 3 and name.endswith(_RGB_SUFFIXES))
            or (floating and name.endswith(INTEGER_ONLY_SUFFIXES))):
        raise InputError(f"{flag} '{path}': expected a volume file (.nii.gz, .nii, .nrrd, .mha) for {what}, "
                         f"got '{Path(path).suffix or name}'")


def load_input(path: str, role: str, **requirements: Any):
    """Read a volume given on the command line and check it (see :func:`meddl.volume.require`)."""
    from . import io
    from .volume import colour_again, require

    kind = requirements.pop("kind", None)
    vol = io.read(path, kind=kind)
    if vol.meta.get("geometry_notice"):
        sys.stderr.write(f"notice: {role} '{path}': {vol.meta['geometry_notice']}\n")
    if requirements.get("rgb"):
        # a colour tool given a file stored as RGB with R = G = B: its own checks (a grey image, a
        # blank slide) say more than "one component"
        vol = colour_again(vol)
    return require(vol, f"{role} '{path}'", **requirements)


# -- placeholders for capabilities not in this build -------------------------------------------

_PENDING = {
    "register": "learned deformable registration",
    "reconstruct": "reconstruction from raw k-space",
    "segment": "few-shot in-context segmentation",
    "batch": "headless cohort processing",
}


def _placeholder_register(sub) -> None:
    p = sub.add_parser("register", parents=[common_options()], help="deformable registration of MOVING onto FIXED")
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True, help="warped moving image")
    p.add_argument("--transform")
    p.add_argument("--jacobian")
    p.add_argument("--moving-labels")
    p.add_argument("--labels-out")
    p.add_argument("--method", choices=("network+optimisation", "network", "optimisation"), default="network+optimisation")
    p.add_argument("--similarity", choices=("lncc", "mi", "deepsim"), default="lncc")

    def run(args, ctx) -> int:
        check_outputs([args.output, args.transform, args.jacobian, args.labels_out], [args.fixed, args.moving, args.moving_labels])
        if bool(args.moving_labels) != bool(args.labels_out):
            raise UsageError("meddl register: --moving-labels and --labels-out go together")
        fixed = load_input(args.fixed, "fixed image", scalar=True, ndim=(2, 3))
        moving = load_input(args.moving, "moving image", scalar=True, ndim=(2, 3))
        if fixed.ndim != moving.ndim:
            raise InputError(f"moving image: expected {fixed.ndim}D like the fixed image, got {moving.ndim}D")
        raise NotAvailableError("meddl register: " + _PENDING["register"] + " is not available in this build yet")

    p.set_defaults(_run=run)


def _placeholder_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", parents=[common_options()], help="reconstruct an image from raw k-space")
    p.add_argument("kspace")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--method", default="auto")
    p.add_argument("--undersample", choices=("equispaced", "random"))
    p.add_argument("--acceleration", type=float)
    p.add_argument("--center-fraction", type=float)
    p.add_argument("--uncertainty")

    def run(args, ctx) -> int:
        check_outputs([args.output, args.uncertainty], [args.kspace])
        path = Path(args.kspace)
        if not path.is_file():
            raise InputError(f"cannot read '{path}': no such file")
        raise NotAvailableError("meddl reconstruct: " + _PENDING["reconstruct"] + " is not available in this build yet")

    p.set_defaults(_run=run)


def _placeholder_segment(sub) -> None:
    p = sub.add_parser("segment", parents=[common_options()], help="segment TARGET from a few examples")
    p.add_argument("target")
    p.add_argument("-o", "--output", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--context", nargs="+", metavar="IMAGE LABEL")
    g.add_argument("--annotated", metavar="PARTIAL_LABELS")
    p.add_argument("--task", default="segmentation")

    def run(args, ctx) -> int:
        inputs = [args.target, args.annotated, *(args.context or [])]
        check_outputs([args.output], inputs)
        if args.context and len(args.context) % 2:
            raise UsageError("meddl segment: --context takes IMAGE LABEL pairs, got an odd number of paths")
        load_input(args.target, "target image", ndim=(2, 3))
        raise NotAvailableError("meddl segment: " + _PENDING["segment"] + " is not available in this build yet")

    p.set_defaults(_run=run)


def _placeholder_batch(sub) -> None:
    p = sub.add_parser("batch", parents=[common_options()], help="run a manifest of jobs on a Dask cluster")
    p.add_argument("manifest")
    p.add_argument("--scheduler")
    p.add_argument("--workers", type=int)

    def run(args, ctx) -> int:
        if not Path(args.manifest).is_file():
            raise InputError(f"cannot read manifest '{args.manifest}': no such file")
        raise NotAvailableError("meddl batch: " + _PENDING["batch"] + " is not available in this build yet")

    p.set_defaults(_run=run)


def _placeholder_adapt(sub) -> None:
    p = sub.add_parser("adapt", parents=[common_options()], help="stain or Fourier domain adaptation")
    p.add_argument("mode", choices=("stain", "fourier"))
    p.add_argument("input")
    p.add_argument("references", nargs="+")
    p.add_argument("-o", "--output", required=True)

    def run(args, ctx) -> int:
        raise NotAvailableError("meddl adapt: domain adaptation is not available in this build yet")

    p.set_defaults(_run=run)


_PLACEHOLDERS: dict[str, Callable] = {
    "adapt": _placeholder_adapt,
    "register": _placeholder_register,
    "reconstruct": _placeholder_reconstruct,
    "segment": _placeholder_segment,
    "batch": _placeholder_batch,
}

# capability command -> the package holding its cli.py
CAPABILITIES = {
    "register": "meddl.registration.cli",
    "reconstruct": "meddl.reconstruction.cli",
    "adapt": "meddl.adaptation.cli",
    "segment": "meddl.incontext.cli",
    "batch": "meddl.batch_cli",
}


def capability_module(name: str):
    """The capability's cli module, or None when the capability is not part of this build."""
    module = CAPABILITIES[name]
    if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None:
        return None
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ModuleNotFoundError:
        return None
    return importlib.import_module(module)


# -- foundation commands ----------------------------------------------------------------------


def _info(sub) -> None:
    p = sub.add_parser("info", parents=[common_options(compute=False)], help="describe a volume file (geometry, kind, range)")
    p.add_argument("path")
    p.add_argument("--kind", choices=("intensity", "label", "complex", "displacement"))
    p.add_argument("--json", action="store_true", help="print one JSON object")

    def run(args, ctx) -> int:
        import numpy as np

        from . import io

        facts = _kspace_facts(args.path)
        if facts is not None:  # raw k-space: what meddl reconstruct will see
            if args.json:
                print(json.dumps(facts))
            else:
                print(f"raw k-space ({facts['format']}): reconstruct it with meddl reconstruct {args.path} -o OUT")
                for k, v in facts.items():
                    print(f"  {k}: {v}")
            return EXIT_OK
        kind = args.kind
        if kind is None and str(args.path).lower().endswith(".seg.nrrd"):
            kind = "label"  # a Slicer segmentation file
        vol = io.read(args.path, kind=kind)
        arr = vol.numpy()
        finite = np.isfinite(arr) if np.issubdtype(arr.dtype, np.inexact) else None
        values = np.abs(arr) if np.iscomplexobj(arr) else arr
        if finite is not None:
            values = values[finite]  # the range of the finite voxels; none at all: null

        def extreme(fn):
            return float(fn(values)) if values.size else None
        facts = {
            "path": args.path,
            "kind": vol.kind.value,
            "dimensions": vol.ndim,
            "channels": vol.channels,
            "shape": list(vol.spatial_shape),
            "spacing_mm": [round(float(s), 6) for s in vol.spacing],
            "origin_ras_mm": [round(float(o), 6) for o in vol.origin],
            "orientation": vol.orientation,
            "dtype": str(arr.dtype),
            "min": extreme(np.min),
            "max": extreme(np.max),
            "nonfinite_voxels": 0 if finite is None else int(finite.size - finite.sum()),
        }
        if np.issubdtype(arr.dtype, np.integer) and vol.channels == 1:
            facts["distinct_values"] = int(np.unique(arr).size)  # a label map's labels (+ background)
        if vol.meta.get("geometry_notice"):
            facts["notice"] = vol.meta["geometry_notice"]
        if vol.meta.get("stored_as"):
            facts["stored_as"] = vol.meta["stored_as"]
        if args.json:
            print(json.dumps(facts))
        else:
            print(repr(vol))
            hints = {}
            if kind is None and vol.kind.value == "intensity" and facts.get("distinct_values", 1001) <= 1000:
                hints["kind"] = " (as read: --kind label reads it as a label map)"
            if vol.channels == 2 and vol.kind.value == "intensity":
                hints["channels"] = (" (a complex image's real and imaginary parts? meddl convert --component "
                                     "magnitude writes its magnitude)")
            for k, v in facts.items():
                print(f"  {k}: {v}{hints.get(k, '')}")
        return EXIT_OK

    p.set_defaults(_run=run, _compute=False)


def _kspace_facts(path: str) -> dict | None:
    """:func:`meddl.reconstruction.describe` of a k-space file (fastMRI/ISMRMRD HDF5, BART .cfl), else None."""
    if capability_module("reconstruct") is None:
        return None
    from .reconstruction.kspace import describe, is_kspace

    return {"path": path, **describe(path)} if is_kspace(path) else None


def _convert(sub) -> None:
    p = sub.add_parser("convert", parents=[common_options(compute=False)],
                       help="convert a NIfTI, NRRD, MHA or PNG/TIFF file or a DICOM series folder to NIfTI, NRRD, "
                            "MHA or PNG/TIFF (geometry kept)")
    p.add_argument("input", help="image file, or a folder holding one DICOM series")
    p.add_argument("-o", "--output", required=True, help="output file; its suffix sets the format (.nii.gz, .nrrd, "
                                                          ".mha, .png, .tif, ...)")
    p.add_argument("--kind", choices=("intensity", "label"),
                   help="read the input as a label map (integer values kept exactly) or as an intensity image")
    p.add_argument("--component", metavar="WHICH",
                   help="write one scalar image: grey (of RGB), magnitude, phase, real or imaginary (of a complex "
                        "image, or of two channels holding its real and imaginary parts), or a channel number")
    p.add_argument("--to-uint8", action="store_true",
                   help="write 8-bit values (for .png/.jpg pictures): the 0.5-99.5th percentile window mapped onto "
                        "0-255")

    def run(args, ctx) -> int:
        from . import io
        from .volume import component, to_uint8

        check_outputs([args.output], [args.input])
        vol = io.read(args.input, kind=args.kind)
        if args.component is not None:
            vol = component(vol, args.component)
        if args.to_uint8:
            vol = to_uint8(vol)
        io.write(vol, args.output)
        print(f"wrote {args.output}: {vol!r}")
        return EXIT_OK

    p.set_defaults(_run=run, _compute=False)


def _samples(sub) -> None:
    p = sub.add_parser("samples", parents=[common_options(compute=False)], help="list or export the offline sample data")
    p.add_argument("names", nargs="*", help="samples to export (default: list them)")
    p.add_argument("-o", "--output-dir", help="folder to copy the exported samples into")

    def run(args, ctx) -> int:
        import shutil

        from . import data

        if not args.names:
            available = set(data.available_samples())
            for name, sample in data.SAMPLES.items():
                mark = "available" if name in available else f"needs apt-get install {sample.source}"
                print(f"{name:36s} {sample.description}  [{mark}]")
            return EXIT_OK
        for name in args.names:
            path = data.sample_path(name)
            if args.output_dir:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                target = Path(args.output_dir) / path.name
                shutil.copyfile(path, target)
                path = target
            print(path)
        return EXIT_OK

    p.set_defaults(_run=run, _compute=False)


def _demo(sub) -> None:
    p = sub.add_parser("demo", parents=[common_options()], help="run every available capability on sample data")
    p.add_argument("-o", "--output-dir", default="demo_output")

    def run(args, ctx) -> int:
        from .demo import run_demo

        run_demo(args.output_dir, ctx)
        return EXIT_OK

    p.set_defaults(_run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meddl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"meddl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in ("register", "reconstruct", "adapt", "segment", "batch"):
        module = capability_module(name)
        if module is not None:
            module.configure(sub)
        else:
            _PLACEHOLDERS[name](sub)
    for add in (_demo, _info, _convert, _samples):
        add(sub)
    return parser


# -- main -------------------------------------------------------------------------------------


def make_context(args) -> tuple[RunContext, Any]:
    """Progress display, device and seed for one command run, from its parsed arguments."""
    import random

    from .device import resolve_device

    mode = args.progress or ("bar" if sys.stderr.isatty() else "none")
    bar = None
    if mode == "json":
        callback = json_progress(sys.stdout)
    elif mode == "bar":
        bar = bar_progress(args.command)
        callback = bar
    else:
        callback = None
    if getattr(args, "_defer_device", lambda a: False)(args):
        from .device import DeviceChoice

        choice = DeviceChoice(args.device, "resolved on each worker")
    else:
        choice = resolve_device(args.device)
    if args.seed is not None:
        import numpy as np
        import torch

        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    ctx = RunContext(Reporter(callback), choice.device, choice.reason, args.seed, mode)
    return ctx, bar


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    bar = None
    try:
        parser = build_parser()
        if not argv:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if getattr(args, "_compute", True):
            ctx, bar = make_context(args)
            ctx.log(f"device: {ctx.device} ({ctx.device_reason})")
            return _run_on_device(args, ctx)
        from .progress import Reporter as _R

        ctx = RunContext(_R(), "cpu", "no computation", None, "none")
        return int(args._run(args, ctx) or EXIT_OK)
    except MedDLError as exc:
        if debug:
            traceback.print_exc()
        code = EXIT_INTERRUPTED if isinstance(exc, Cancelled) else EXIT_USAGE
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return code
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`meddl info x | head`): stop quietly, as Unix tools do
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:  # a bug: say so on one line, traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); "
              "rerun with --debug and report it", file=sys.stderr)
        return EXIT_BUG
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _run_on_device(args: argparse.Namespace, ctx: RunContext) -> int:
    """Run the command on ``ctx.device``; a GPU out-of-memory error reruns it on the CPU with a warning
    (outputs are written atomically, so nothing half-written is left by the first try)."""
    from .device import run_with_fallback

    def step(device: Any) -> int:
        if str(device) != str(ctx.device):
            ctx.log(f"device: {device} (the GPU ran out of memory; rerunning on the CPU)")
            ctx.device = device
        return int(args._run(args, ctx) or EXIT_OK)

    return run_with_fallback(step, ctx.device, f"meddl {getattr(args, 'command', '')}".strip())[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
