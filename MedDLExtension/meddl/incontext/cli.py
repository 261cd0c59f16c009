"""``meddl segment``: few-shot in-context segmentation (and image tasks) of a volume.

    meddl segment T1.nii.gz -o seg.nii.gz --annotated painted.nii.gz
    meddl segment T1.nii.gz -o seg.nii.gz --context other_T1.nii.gz other_seg.nii.gz [IMAGE LABEL ...]
    meddl segment noisy.nii.gz -o clean.nii.gz --task denoise --context noisy2.nii.gz clean2.nii.gz
"""

from __future__ import annotations

from .. import cli
from ..errors import InputError
from ..volume import Kind
from .inference import ALIGN_MODES, MAX_CONTEXT, SegmentConfig, Selection, Task

__all__ = ["configure", "run"]


def configure(subparsers) -> None:
    p = subparsers.add_parser("segment", parents=[cli.common_options()], help="segment TARGET from a few examples",
                              description="Few-shot in-context segmentation (Neuralizer-style): a structure, or an "
                                          "image task, shown by a few painted slices or a few segmented scans.")
    p.add_argument("target", help="image to segment (2D or 3D)")
    p.add_argument("-o", "--output", required=True, help="label map (segmentation) or image (image tasks)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--context", nargs="+", metavar="IMAGE LABEL",
                   help="pairs of another scan and its segmentation (or output image for image tasks)")
    g.add_argument("--annotated", metavar="PARTIAL_LABELS",
                   help="label map on the target's grid with a few painted slices: the other slices are filled")
    p.add_argument("--task", choices=[t.value for t in Task], default=Task.SEGMENTATION.value)
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=None,
                   help="voxel axis to cut slices along (default: the painted axis, else the coarsest)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="label values to segment (default: all)")
    p.add_argument("--context-size", type=int, default=16, help=f"context slices per target slice, 1-{MAX_CONTEXT}")
    p.add_argument("--selection", choices=[s.value for s in Selection], default=Selection.AUTO.value,
                   help="context slices per target: auto (bracket when propagating, else nearest), nearest, "
                        "bracket (nearest on each side; the nearer one with --context-size 1), similar")
    p.add_argument("--prior", type=float, default=0.5,
                   help="propagation: weight of the interpolation of the painted slices mixed with the network "
                        "between painted slices (0 = network only, 1 = interpolation only); it fades beyond them")
    p.add_argument("--align", choices=ALIGN_MODES, default="auto",
                   help="--context: bring each context scan onto the target's grid first: auto (default: "
                        "deformable for a 2D target, affine for a 3D one), affine (centre of mass, rigid, affine by "
                        "mutual information), deformable (the affine, then a deformable registration per example: "
                        "about 0.1 s for a 2D pair, 6-16 s for a 3D brain on a CPU; a little more accurate), "
                        "center (centres of mass) or none (use the scans as they are, slices matched by relative "
                        "position)")
    p.add_argument("--atlas-prior", type=float, default=0.25,
                   help="--context segmentation: weight of the aligned examples' own labels (their mean, a "
                        "multi-atlas vote) mixed with the network's answer (0 = network only, 1 = vote only)")
    p.add_argument("--augment", type=int, default=16,
                   help="--context segmentation: when a target slice gets fewer context slices than this, add "
                        "slightly deformed copies of them up to this many (0: none)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="segmentation: probability above which a voxel belongs to the segment")
    p.add_argument("--finetune-steps", type=int, default=0, help="test-time fine-tuning steps on the context")
    p.add_argument("--weights", default=None, help="weights file (its JSON card beside it) instead of the bundled one")
    p.set_defaults(_run=run)


def run(args, ctx) -> int:
    from .. import io
    from . import segment

    inputs = [args.target, args.annotated, *(args.context or [])]
    cli.check_outputs([args.output], inputs)
    if args.context and len(args.context) % 2:
        raise cli.UsageError("meddl segment: --context takes IMAGE LABEL pairs, got an odd number of paths")
    config = SegmentConfig(task=args.task, axis=args.axis, context_size=args.context_size, selection=args.selection,
                           prior=args.prior, align=args.align, augment=args.augment,
                           atlas_prior=args.atlas_prior,
                           threshold=args.threshold, labels=tuple(args.labels) if args.labels else None,
                           finetune_steps=args.finetune_steps, weights=args.weights,
                           seed=args.seed if args.seed is not None else 0)
    target = cli.load_input(args.target, "target image", ndim=(2, 3))
    flat = target.ndim == 2 or target.spatial_shape[-1] == 1
    cli.check_output_format(args.output, "-o", ndim=2 if flat else 3, floating=not config.is_mask)
    label_kind = Kind.LABEL if config.is_mask else None
    context = annotated = None
    if args.annotated:
        annotated = cli.load_input(args.annotated, "--annotated", ndim=(3,), kind=Kind.LABEL)
    else:
        context = []
        for i in range(0, len(args.context), 2):
            image = cli.load_input(args.context[i], f"context image {i // 2 + 1}", ndim=(2, 3))
            label = cli.load_input(args.context[i + 1], f"context label {i // 2 + 1}", ndim=(2, 3), kind=label_kind)
            context.append((image, label))
    if target.kind is Kind.LABEL:
        raise InputError(f"target image '{args.target}': expected an intensity image, got a label map")
    ctx.log(f"segment: {config.task.value}, " + (f"{len(context)} context scan(s)" if context else "propagation"))
    result = segment(target, config, context=context, annotated=annotated, progress=ctx.reporter, device=ctx.device)
    for notice in result.meta.get("notices", []):
        ctx.log(f"notice: {notice}")
    io.write(result, args.output)
    facts = {"output": args.output}
    if result.meta.get("axis") is not None:  # a 3D target's slicing axis (a 2D target has none)
        facts["axis"] = result.meta["axis"]
    if result.kind is Kind.LABEL:
        import numpy as np

        facts["labels"] = len([v for v in np.unique(result.numpy()) if v != 0])
    ctx.summary(f"segment ({config.task.value})", **facts)
    return cli.EXIT_OK
