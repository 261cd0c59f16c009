"""``meddl adapt stain|fourier|histogram|classwise``: the command line of domain adaptation.

``configure(subparsers)`` adds the commands; ``run(args, ctx)`` runs one (``ctx``: a
:class:`meddl.cli.RunContext` with ``reporter``, ``device``, ``seed`` and ``log``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

__all__ = ["configure", "run"]

_SUFFIXES = (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".png", ".tif", ".tiff", ".jpg", ".jpeg")


def _parents() -> list[argparse.ArgumentParser]:
    """The common flags (--device, --progress, --seed, --debug) of the main command, if it has them."""
    try:
        from ..cli import common_options  # the main cli owns the common flags
    except ImportError:  # pragma: no cover - the library without its command line
        return []
    return [common_options()]


def configure(subparsers) -> argparse.ArgumentParser:
    """Add ``adapt`` with its methods to the main command's subparsers."""
    p = subparsers.add_parser(
        "adapt", help="stain normalisation (histology) or Fourier domain adaptation (any volume)",
        description="Domain adaptation: move an image into the style of reference images.",
    )
    methods = p.add_subparsers(dest="adapt_command", metavar="METHOD", parser_class=type(p))
    parents = _parents()

    s = methods.add_parser("stain", parents=parents, help="normalise the stain colours of an RGB slide to a reference")
    s.add_argument("input", help="RGB image (PNG, TIFF, JPEG, NRRD ...)")
    s.add_argument("reference", help="RGB image with the target staining")
    s.add_argument("-o", "--output", required=True, help="normalised RGB image")
    s.add_argument("--method", choices=("macenko", "reinhard", "vahadane"), default="macenko",
                   help="macenko (stain vectors from the optical-density plane), vahadane (sparse non-negative "
                        "factorisation) or reinhard (colour statistics in LAB)")
    s.add_argument("--stains-out", metavar="PREFIX",
                   help="also write the stain concentrations as scalar volumes PREFIX_H, PREFIX_E (and PREFIX_DAB)")
    s.add_argument("--separation", choices=("hed", "macenko", "vahadane"),
                   help="stain vectors for --stains-out: fixed H/E/DAB (hed) or estimated (default: the method's, "
                        "hed for reinhard)")
    s.add_argument("--tissue", choices=("od", "luminosity"), default="od", help="tissue detector")
    s.add_argument("--light-intensity", type=float, default=240.0, help="transmitted light intensity I0")
    s.add_argument("--tiled", action="store_true",
                   help="stream a TIFF of any size tile by tile (TIFF in, tiled TIFF out)")
    s.set_defaults(_run=run, _adapt="stain", _compute=True, _derived_outputs=stain_outputs)

    f = methods.add_parser("fourier", parents=parents,
                           help="Fourier domain adaptation (FDA): swap the low-frequency amplitude spectrum")
    f.add_argument("input", help="volume or image to adapt")
    f.add_argument("references", nargs="+", metavar="REFERENCE", help="one or more volumes in the target style")
    f.add_argument("-o", "--output", required=True,
                   help="adapted volume; with --combine each, one file per reference (OUTPUT_1, OUTPUT_2, ...)")
    f.add_argument("--beta", type=float, default=None,
                   help="window size as a fraction of the image size, 0-0.5 (default: 0.01 square, 0.03 circle)")
    f.add_argument("--window", choices=("square", "circle"), default="circle",
                   help="low-frequency window whose amplitude is swapped: circle (feather-light FDA) or square "
                        "(Yang & Soatto)")
    f.add_argument("--mode", choices=("2d", "3d"), default="3d", help="slice-wise or whole-volume transform")
    f.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=2, help="slice axis for --mode 2d (I, J, K)")
    f.add_argument("--combine", choices=("mean", "each"), default="mean",
                   help="several references: mean (their mean amplitude, one output) or each (one output per "
                        "reference)")
    f.add_argument("--donors", type=int, default=None, help="use only the N references most similar to the input")
    f.add_argument("--no-clip", action="store_true", help="do not clip the output to the input's intensity range")
    f.add_argument("--domain", choices=("intensity", "log"), default="intensity",
                   help="adapt the image's spectrum, or its logarithm's (multiplicative shifts such as MR bias "
                        "fields; non-negative images only)")
    f.add_argument("--log-offset", type=float, default=0.05,
                   help="log domain: log(x + c), c = this fraction of each image's 99th percentile (default 0.05)")
    f.add_argument("--histogram-match", action="store_true",
                   help="baseline: SimpleITK histogram matching to the references instead of FDA")
    f.set_defaults(_run=run, _adapt="fourier", _compute=True, _derived_outputs=fourier_outputs)

    h = methods.add_parser("histogram", parents=parents, help="baseline: histogram matching (SimpleITK)")
    h.add_argument("input")
    h.add_argument("reference")
    h.add_argument("-o", "--output", required=True)
    h.add_argument("--levels", type=int, default=256, help="histogram bins (SimpleITK's NumberOfHistogramLevels)")
    h.add_argument("--match-points", type=int, default=7,
                   help="quantiles matched between the two histograms (SimpleITK's NumberOfMatchPoints)")
    h.set_defaults(_run=run, _adapt="histogram", _compute=True)

    c = methods.add_parser("classwise", parents=parents,
                           help="baseline: per-class mean/std alignment where labels exist (CateNorm)")
    c.add_argument("input", help="image to adapt")
    c.add_argument("labels", help="label map of the input on its grid (classes by value)")
    c.add_argument("reference", help="image whose per-class statistics are the target")
    c.add_argument("reference_labels", help="label map of the reference on its grid (the same values)")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(_run=run, _adapt="classwise", _compute=True)

    def no_method(args, ctx) -> int:
        raise InputError("meddl adapt: expected a method, one of stain, fourier, histogram, classwise "
                         "(see 'meddl adapt --help')")

    p.set_defaults(_run=no_method, _compute=False)
    return p


def _numbered(path: str, i: int) -> str:
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return str(Path(path).with_name(f"{name[: -len(suffix)]}_{i}{name[-len(suffix):]}"))
    return f"{path}_{i}"


def _stain_path(prefix: str, stain: str) -> str:
    name = Path(prefix).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return str(Path(prefix).with_name(f"{name[: -len(suffix)]}_{stain}{name[-len(suffix):]}"))
    return f"{prefix}_{stain}.nrrd"


def stain_outputs(args) -> list[str]:
    """The stain-concentration files ``--stains-out PREFIX`` writes (none without it)."""
    if not args.stains_out:
        return []
    separation = args.separation or ("hed" if args.method == "reinhard" else args.method)
    names = ("H", "E", "DAB") if separation == "hed" else ("H", "E")
    return [_stain_path(args.stains_out, n) for n in names]


def fourier_outputs(args) -> list[str]:
    """The files ``adapt fourier`` writes: the output, or one numbered file per reference
    (``--combine each``, at most ``--donors``)."""
    if args.combine != "each":
        return [args.output]
    n_out = len(args.references) if args.donors is None else min(len(args.references), max(args.donors, 1))
    return [_numbered(args.output, i + 1) for i in range(n_out)]


def _colour_alike(volumes: list) -> list:
    """Grey pictures stored as RGB (read as one channel, ``meta["stored_as"]``) get their three
    channels back when another image of the command is in colour, so the two still pair up."""
    from ..volume import colour_again

    return [colour_again(v) for v in volumes] if any(v.channels == 3 for v in volumes) else volumes


def run(args, ctx) -> int:
    """Run the method chosen on the command line; 0 on success."""
    from .. import io
    from ..cli import check_outputs, load_input

    which = args._adapt
    rep = ctx.reporter
    if which == "stain":
        from .stain import Separation, StainConfig, adapt_stain, separate_stains

        config = StainConfig(method=args.method, tissue=args.tissue, light_intensity=args.light_intensity)
        separation = args.separation or ("hed" if args.method == "reinhard" else args.method)
        stain_names = ("H", "E", "DAB") if separation == "hed" else ("H", "E")
        stain_paths = stain_outputs(args)
        for path in stain_paths:  # found before any work, not after the main output is written
            if Path(path).suffix.lower() in io.INTEGER_ONLY_SUFFIXES:
                raise InputError(f"--stains-out: stain concentrations are floating point, which '{Path(path).suffix}' "
                                 "cannot hold; give a .nrrd, .nii.gz, .mha or .tif prefix (or none: .nrrd)")
        check_outputs([args.output, *stain_paths], [args.input, args.reference])
        reference = load_input(args.reference, "reference", rgb=True, ndim=(2, 3))
        if args.tiled:
            from .tiling import adapt_stain_tiff

            for path in (args.input, args.output):
                if Path(path).suffix.lower() not in (".tif", ".tiff"):
                    raise InputError(f"--tiled: expected TIFF input and output, got '{path}'")
            adapt_stain_tiff(args.input, reference, args.output, config, rep.stage(0.0, 0.8 if stain_paths else 1.0),
                             device=ctx.device)
            image = load_input(args.input, "input", rgb=True, ndim=(2, 3)) if stain_paths else None
        else:
            image = load_input(args.input, "input", rgb=True, ndim=(2, 3))
            out = adapt_stain(image, reference, config, rep.stage(0.0, 0.8 if stain_paths else 1.0),
                              device=ctx.device)
            io.write(out, args.output)
        if stain_paths:
            stains = separate_stains(image, Separation(separation), config, rep.stage(0.8, 1.0), device=ctx.device)
            for name, path in zip(stain_names, stain_paths, strict=True):
                io.write(stains[name], path)
            ctx.log("stains: " + ", ".join(stain_paths))
        ctx.summary(f"stain normalisation ({args.method}) -> {args.output}")
        return 0

    if which == "fourier":
        from .fourier import FourierConfig, adapt_fourier

        config = FourierConfig(beta=args.beta, window=args.window, mode=args.mode, combine=args.combine,
                               slice_axis=args.slice_axis, donors=args.donors, preserve_range=not args.no_clip,
                               domain=args.domain, log_offset=args.log_offset)
        outputs = fourier_outputs(args)
        check_outputs(outputs, [args.input, *args.references])
        image = load_input(args.input, "input", ndim=(2, 3))
        refs = [load_input(r, f"reference {i + 1}", ndim=(2, 3)) for i, r in enumerate(args.references)]
        image, *refs = _colour_alike([image, *refs])
        if image.channels == 2:  # how a complex MetaImage reads: each part's spectrum is not the image's
            ctx.log(f"notice: '{args.input}': its 2 channels are adapted one by one; if they are a complex image's "
                    "real and imaginary parts, adapt its magnitude instead (meddl convert IN -o OUT --component "
                    "magnitude)")
        if args.histogram_match:
            if args.domain != "intensity":
                raise InputError("--domain: applies to Fourier adaptation, not to --histogram-match")
            if args.beta is not None:
                raise InputError("--beta: applies to Fourier adaptation, not to --histogram-match")
            results = _histogram_baseline(image, refs, config, rep)
        else:
            result = adapt_fourier(image, refs, config, rep, device=ctx.device)
            results = result if isinstance(result, list) else [result]
        for vol, path in zip(results, outputs, strict=True):
            io.write(vol, path)
        from ..volume import one_slice_axis

        mode = "2d" if image.ndim == 2 or one_slice_axis(image) is not None else config.mode.value  # as it ran
        what = "histogram matching" if args.histogram_match else f"Fourier adaptation ({config.window.value}, {mode}, {config.domain.value} domain)"
        ctx.summary(f"{what} -> {', '.join(outputs)}")
        return 0

    if which == "histogram":
        from .baselines import histogram_match

        check_outputs([args.output], [args.input, args.reference])
        image = load_input(args.input, "input", ndim=(2, 3))
        reference = load_input(args.reference, "reference", ndim=(2, 3))
        image, reference = _colour_alike([image, reference])
        rep(0.0, "histogram matching")
        io.write(histogram_match(image, reference, args.levels, args.match_points), args.output)
        rep(1.0, "done")
        ctx.summary(f"histogram matching -> {args.output}")
        return 0

    if which == "classwise":
        from .baselines import align_class_statistics

        check_outputs([args.output], [args.input, args.labels, args.reference, args.reference_labels])
        image = load_input(args.input, "input", ndim=(2, 3))
        labels = load_input(args.labels, "labels", ndim=(2, 3), kind="label")
        reference = load_input(args.reference, "reference", ndim=(2, 3))
        image, reference = _colour_alike([image, reference])
        ref_labels = load_input(args.reference_labels, "reference labels", ndim=(2, 3), kind="label")
        rep(0.0, "aligning class statistics")
        io.write(align_class_statistics(image, labels, reference, ref_labels), args.output)
        rep(1.0, "done")
        ctx.summary(f"class statistics alignment -> {args.output}")
        return 0
    raise InputError(f"meddl adapt: unknown method '{which}'")


def _histogram_baseline(image, refs, config, rep):
    import numpy as np

    from .baselines import histogram_match
    from .fourier import Combine, rank_donors

    for i, ref in enumerate(refs):
        if ref.ndim != image.ndim:
            raise InputError(f"reference {i + 1}: expected a {image.ndim}D volume like the input, got {ref.ndim}D")
    if config.donors is not None and config.donors < len(refs):  # the most similar, as FDA chooses them
        refs = [refs[i] for i, _ in rank_donors(image, refs)[: config.donors]]
    outs = []
    for i, ref in enumerate(refs):
        outs.append(histogram_match(image, ref))
        rep((i + 1) / len(refs), "histogram matching")
    if config.combine is Combine.EACH:
        return outs
    return [image.with_data(np.mean([o.numpy() for o in outs], axis=0).astype(np.float32))]
