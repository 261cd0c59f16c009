"""``meddl reconstruct``: a fastMRI / ISMRMRD k-space file -> image volume (and extras).

meddl reconstruct file.h5 -o recon.nii.gz [--method auto|varnet|tv|l1-wavelet|cg-sense|zero-filled]
    [--undersample equispaced|random|poisson --acceleration 4 --center-fraction 0.08]
    [--uncertainty unc.nii.gz] [--zero-filled zf.nii.gz] [--coils-out coils.nrrd]
    [--weights my_varnet.pt] [--slices 2,3,4 | 2:5]

meddl simulate-kspace image.nii.gz -o kspace.h5|kspace.cfl [--coils 8] [--noise 0.005] [--axis 2] [--complex auto]
    (a fully sampled fastMRI-style file from any image or volume, to try the methods on)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cli import check_output_format, check_outputs, common_options
from ..errors import InputError
from .masks import MaskType
from .pipeline import Method, ReconstructionConfig, reconstruct

__all__ = ["configure", "run", "run_simulate", "parse_slices"]

def parse_slices(text: str | None) -> tuple[int, ...] | None:
    """``"2,3,4"`` or ``"2:5"`` (end exclusive) -> slice indices (the readers require consecutive ones)."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if ":" in part:
                a, b = part.split(":", 1)
                out.extend(range(int(a), int(b)))
            elif part:
                out.append(int(part))
    except ValueError:
        raise InputError(f"--slices: expected indices like 2,3,4 or a range 2:5, got '{text}'") from None
    if not out:
        raise InputError(f"--slices: expected at least one index, got '{text}'")
    return tuple(out)


def configure(subparsers) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        parents=[common_options()],
        help="reconstruct an image from raw k-space",
        description="Reconstruct magnitude images from a fastMRI or ISMRMRD k-space file.",
    )
    p.add_argument("kspace", help="fastMRI HDF5 (.h5), ISMRMRD dataset (.h5) or BART data (NAME.cfl + NAME.hdr)")
    p.add_argument("-o", "--output", required=True, help="reconstructed magnitude volume (.nii.gz, .nrrd, ...)")
    p.add_argument(
        "--method",
        default="auto",
        choices=[m.value for m in Method],
        help="auto (default: varnet or tv, whichever predicts held-out k-space lines of this file better; varnet "
        "from 6x on), varnet (learned variational network: the best SSIM in our benchmark of brain images, and "
        "fast), tv (total-variation compressed sensing, the best classical method), l1-wavelet, cg-sense or "
        "zero-filled (fully sampled files always get the direct reconstruction from auto and varnet)",
    )
    p.add_argument(
        "--undersample",
        choices=[m.value for m in MaskType],
        help="retrospectively undersample fully sampled data with this mask",
    )
    p.add_argument("--acceleration", type=float, help="acceleration of --undersample (default 4)")
    p.add_argument("--center-fraction", type=float, help="centre fraction of --undersample (default 0.32 / R)")
    p.add_argument("--uncertainty", metavar="OUT", help="also write a SURE per-pixel error estimate")
    p.add_argument("--zero-filled", metavar="OUT", help="also write the zero-filled RSS image")
    p.add_argument(
        "--coils-out",
        "--coil-images",
        dest="coils_out",
        metavar="OUT",
        help="also write the per-coil zero-filled magnitude images (one channel per coil)",
    )
    p.add_argument("--phase", metavar="OUT", help="also write the phase (radians) of the complex image")
    p.add_argument("--combine", choices=("rss", "sense"), default="rss",
                   help="coil combination of the zero-filled image (--method zero-filled, --zero-filled): root sum "
                        "of squares, or sensitivity-weighted with ESPIRiT maps from the calibration region")
    p.add_argument("--weights", help="VarNet weights file (a state dict with its JSON card beside it)")
    p.add_argument("--slices", help="consecutive slices to reconstruct: 2,3,4 or 2:5 (default all)")
    p.add_argument("--repetition", type=int, metavar="N",
                   help="ISMRMRD files: reconstruct repetition N only, as acquired (default: all repetitions, "
                        "their lines averaged or merged)")
    p.add_argument("--iterations", type=int, help="solver iterations (classical methods)")
    p.add_argument("--regularization", "--regularisation", dest="regularization", type=float, help="lambda for cg-sense / l1-wavelet / tv (data scaled to max 1)")
    p.add_argument("--probes", type=int, default=4, help="Monte-Carlo probes for --uncertainty")
    p.set_defaults(_run=run)

    s = subparsers.add_parser(
        "simulate-kspace",
        parents=[common_options()],
        help="simulate fully sampled multi-coil k-space (fastMRI .h5 or BART .cfl) from an image",
        description="Simulate a fully sampled multi-coil fastMRI-style k-space file from an image or volume "
        "(complex images keep their phase; magnitude images get a smooth random one), to reconstruct with "
        "'meddl reconstruct FILE --undersample equispaced'.",
    )
    s.add_argument("image", help="2D or 3D image (.nii.gz, .nrrd, .mha; a complex MetaImage keeps its phase)")
    s.add_argument("-o", "--output", required=True,
                   help="k-space to write: fastMRI .h5 (with the reference image and voxel size), or BART "
                        "NAME.cfl (+ NAME.hdr; k-space only)")
    s.add_argument("--coils", type=int, default=8, help="simulated receive coils (birdcage-like maps), 1-64")
    s.add_argument("--noise", type=float, default=0.005,
                   help="complex noise std as a fraction of the image maximum (default 0.005)")
    s.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis of a 3D volume (I, J, K)")
    s.add_argument("--complex", dest="complex_input", choices=("auto", "yes", "no"), default="auto",
                   help="auto: two channels are the real and imaginary parts (how a complex MetaImage "
                        "reads), one channel a magnitude")
    s.set_defaults(_run=run_simulate)


def run_simulate(args, ctx) -> int:
    from .. import io
    from .bart_io import cfl_names
    from .simulate import simulate_file

    bart = args.output.lower().endswith((".cfl", ".hdr"))
    check_outputs(cfl_names(args.output) if bart else [args.output], [args.image])
    if not (bart or args.output.lower().endswith(".h5")):
        raise InputError(f"--output '{args.output}': expected a fastMRI k-space file name ending in .h5, "
                         "or BART data ending in .cfl")
    volume = io.read(args.image)
    path, facts = simulate_file(volume, args.output, coils=args.coils, noise=args.noise,
                                seed=0 if ctx.seed is None else ctx.seed, axis=args.axis,
                                complex_input=args.complex_input, progress=ctx.reporter)
    ctx.log(f"wrote {path}: " + json.dumps(facts))
    notice = facts.pop("notice", None)
    if notice:
        ctx.log("notice: " + notice)
    ctx.summary(f"simulate-kspace: {args.image} -> {path}", **facts)
    return 0


def run(args, ctx) -> int:
    from .. import io

    check_outputs(
        [args.output, args.uncertainty, args.zero_filled, args.coils_out, args.phase], [args.kspace, args.weights]
    )
    for value, flag in (
        (args.output, "--output"),
        (args.uncertainty, "--uncertainty"),
        (args.zero_filled, "--zero-filled"),
        (args.coils_out, "--coils-out"),
        (args.phase, "--phase"),
    ):
        check_output_format(value, flag, 3, floating=True)
    path = Path(args.kspace)
    from .bart_io import cfl_pair

    if not path.is_file() and cfl_pair(path) is None:  # BART names its data without a suffix
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise InputError(f"cannot read '{path}': {what}")
    config = ReconstructionConfig(
        method=args.method,
        undersample=args.undersample,
        acceleration=args.acceleration,
        center_fraction=args.center_fraction,
        seed=0 if ctx.seed is None else ctx.seed,
        iterations=args.iterations,
        regularization=args.regularization,
        uncertainty=bool(args.uncertainty),
        probes=args.probes,
        coil_images=bool(args.coils_out),
        phase=bool(args.phase),
        combine=args.combine,
        slices=parse_slices(args.slices),
        repetition=args.repetition,
        weights=args.weights,
    )
    # a GPU out-of-memory error reruns the whole command on the CPU (cli._run_on_device)
    result = reconstruct(path, config, device=ctx.device, progress=ctx.reporter)
    info = result.info
    ctx.log("k-space: " + json.dumps({k: info[k] for k in ("coils", "slices", "acceleration", "center_fraction")}))
    if result.image.meta.get("geometry_notice"):
        ctx.log(f"notice: '{path}': {result.image.meta['geometry_notice']}")
    if info.get("notice"):
        ctx.log(f"notice: '{path}': {info['notice']}")
    io.write(result.image, args.output)
    ctx.log(f"wrote {args.output}: {result.image!r}")
    for vol, out in (
        (result.zero_filled, args.zero_filled),
        (result.uncertainty, args.uncertainty),
        (result.coil_images, args.coils_out),
        (result.phase, args.phase),
    ):
        if out and vol is not None:
            io.write(vol, out)
            ctx.log(f"wrote {out}")
    if info.get("reference"):
        ctx.log("against the file's reference image (reconstruction_rss): " + json.dumps(info["reference"]))
    ctx.summary(
        f"reconstruct: {info['method']} -> {args.output}",
        method=info["method"],
        acceleration=info["acceleration"],
        slices=info["slices"],
        seconds_per_slice=info["seconds_per_slice"],
        **({"ssim_vs_reference": info["reference"]["ssim"]} if "ssim" in info.get("reference", {}) else {}),
    )
    return 0
