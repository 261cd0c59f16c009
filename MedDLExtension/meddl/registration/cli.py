"""``meddl register``: deformable registration of MOVING onto FIXED from the command line.

    meddl register fixed.nii.gz moving.nii.gz -o warped.nii.gz --transform warp.h5 \\
        --jacobian jac.nii.gz --inverse inverse.h5 --moving-labels seg.nii.gz --labels-out seg_warped.nii.gz

The transform files hold the displacement in the resampling convention (``.h5``/``.tfm``: an ITK
``DisplacementFieldTransform``; ``.nii.gz``/``.nrrd``/``.mha``: the LPS vector image), so
SimpleITK ``Resample(moving, fixed, transform)`` reproduces the warped image and Slicer loads
it as a transform node.
"""

from __future__ import annotations

from .. import cli as _cli
from ..errors import InputError
from ..transforms import FIELD_IMAGE_SUFFIXES, TRANSFORM_SUFFIXES

__all__ = ["configure", "run"]


def _suffix_ok(path: str | None) -> bool:
    if not path:
        return True
    lower = path.lower()
    return any(lower.endswith(s) for s in TRANSFORM_SUFFIXES + FIELD_IMAGE_SUFFIXES)


def configure(sub) -> None:
    """Add the ``register`` sub-command to the ``meddl`` parser."""
    p = sub.add_parser("register", parents=[_cli.common_options()], help="deformable registration of MOVING onto FIXED",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("fixed", help="fixed image (the answer is on its grid)")
    p.add_argument("moving", help="moving image (any grid, size and spacing)")
    p.add_argument("-o", "--output", required=True, help="warped moving image")
    p.add_argument("--transform", help="displacement as an ITK transform (.h5, .tfm) or vector image (.nii.gz, .nrrd)")
    p.add_argument("--jacobian", help="Jacobian-determinant map (values <= 0 mark folding)")
    p.add_argument("--inverse", help="inverse transform (moving -> fixed), same formats as --transform")
    p.add_argument("--moving-labels", help="label map on the moving grid, warped nearest-neighbour")
    p.add_argument("--labels-out", help="where the warped labels go (with --moving-labels)")
    p.add_argument("--method", choices=("network+optimisation", "network", "optimisation"),
                   default="network+optimisation",
                   help="network+optimisation (the network's field refined on this pair), network (one pass, "
                        "fastest) or optimisation (instance optimisation from zero)")
    p.add_argument("--similarity", choices=("lncc", "mi", "mind", "deepsim"), default="lncc",
                   help="lncc (same contrast), mi or mind (across contrasts), deepsim (semantic features)")
    p.add_argument("--affine", choices=("affine", "center", "none"), default="affine",
                   help="pre-alignment (default affine; none trusts the scanner coordinates)")
    p.add_argument("--iterations", type=int, nargs="+", default=None, metavar="N",
                   help="most optimisation steps per resolution level: one number, or one per level coarse to "
                        "fine (default 15)")
    p.add_argument("--regularisation", "--regularization", dest="regularisation", type=float, default=None,
                   help="weight of the smoothness term (default: 1, or 0.1 with --similarity mind)")
    p.add_argument("--fold-penalty", type=float, default=None,
                   help="weight of the barrier against folding (det J < 0.1; default 100, 0 turns it off)")
    p.add_argument("--levels", type=float, nargs="+", default=None, metavar="MM",
                   help="grid spacings of the optimisation, coarse to fine (default: 5 3 2 for a human head, "
                        "scaled down for a smaller field of view)")
    p.add_argument("--crop-margin", default=None, metavar="MM",
                   help="optimise on the bounding box of the fixed image's foreground grown by this margin (default "
                        "10 mm), or 'none' for the whole field of view")
    p.add_argument("--weights", help="registration-network weights (default: bundled)")
    p.add_argument("--deepsim-weights", help="DeepSim feature-extractor weights (default: bundled)")
    p.set_defaults(_run=run)


def run(args, ctx) -> int:
    """Read, register, write; one summary line with % folding, time and device."""
    from .. import io, transforms
    from ..volume import Kind
    from . import RegistrationConfig, register

    outputs = [args.output, args.transform, args.jacobian, args.inverse, args.labels_out]
    _cli.check_outputs(outputs, [args.fixed, args.moving, args.moving_labels])
    if bool(args.moving_labels) != bool(args.labels_out):
        raise _cli.UsageError("meddl register: --moving-labels and --labels-out go together")
    for flag, path in (("--transform", args.transform), ("--inverse", args.inverse)):
        if not _suffix_ok(path):
            raise InputError(
                f"{flag} '{path}': unknown transform format; expected one of "
                f"{', '.join(TRANSFORM_SUFFIXES + FIELD_IMAGE_SUFFIXES)}"
            )
    if args.iterations is not None and min(args.iterations) < 0:
        raise InputError(f"--iterations: expected integers >= 0, got {' '.join(map(str, args.iterations))}")
    fixed = _cli.load_input(args.fixed, "fixed image", scalar=True, ndim=(2, 3))
    moving = _cli.load_input(args.moving, "moving image", scalar=True, ndim=(2, 3))
    if fixed.ndim != moving.ndim:
        raise InputError(f"moving image: expected {fixed.ndim}D like the fixed image, got {moving.ndim}D")
    floating_warp = moving.numpy().dtype.kind == "f"  # the warped image keeps the moving image's type
    for flag, path, floating in (("-o", args.output, floating_warp), ("--jacobian", args.jacobian, True),
                                 ("--labels-out", args.labels_out, False)):
        _cli.check_output_format(path, flag, fixed.ndim, floating)  # before the registration, not after it
    labels = None
    if args.moving_labels:
        labels = _cli.load_input(args.moving_labels, "--moving-labels", kind=Kind.LABEL, scalar=True, ndim=(2, 3))
    overrides = {}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations[0] if len(args.iterations) == 1 else tuple(args.iterations)
    if args.regularisation is not None:
        overrides["regularisation"] = args.regularisation
    if args.fold_penalty is not None:
        overrides["fold_penalty"] = args.fold_penalty
    if args.crop_margin is not None:
        if str(args.crop_margin).strip().lower() == "none":
            overrides["crop_margin_mm"] = None
        else:
            try:
                overrides["crop_margin_mm"] = float(args.crop_margin)
            except ValueError:
                raise InputError(f"--crop-margin: expected a margin in mm or 'none', got '{args.crop_margin}'") from None
    if args.levels is not None:
        if any(b > a for a, b in zip(args.levels, args.levels[1:], strict=False)):
            raise InputError(f"--levels: expected spacings from coarse to fine, got {' '.join(map(str, args.levels))}")
        overrides["levels_mm"] = tuple(args.levels)
    config = RegistrationConfig(
        method=args.method, similarity=args.similarity, affine=args.affine, weights=args.weights,
        deepsim_weights=args.deepsim_weights, device=str(ctx.device), inverse=bool(args.inverse),
        seed=args.seed if args.seed is not None else 0, **overrides)
    result = register(fixed, moving, config, progress=ctx.reporter, moving_labels=labels)
    for note in result.summary.get("notes", []):
        ctx.log(f"note: {note}")
    io.write(result.warped, args.output)
    if args.transform:
        transforms.write_transform(result.displacement, args.transform)
    if args.inverse and result.inverse is not None:
        transforms.write_transform(result.inverse, args.inverse)
    if args.jacobian:
        io.write(result.jacobian, args.jacobian)
    if args.labels_out and result.warped_labels is not None:
        io.write(result.warped_labels, args.labels_out)
    s = result.summary
    ctx.summary(f"registered {args.moving} onto {args.fixed} -> {args.output}", method=s["method"],
                folding=f"{s['folding_percent']:.2f}%", sdlogj=s["sdlogj"])
    return 0
