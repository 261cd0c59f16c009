"""Headless Slicer batch: every job of a ``meddl`` manifest through the Slicer modules' Logic.

Usage::

    Slicer --no-main-window --python-script Resources/Scripts/batch.py -- MANIFEST
        [--output-root DIR] [--report OUT.json] [--device auto|cpu|cuda|cuda:N|mps] [--seed N]

The manifest is the one ``meddl batch`` reads (CSV or JSON Lines, checked the same way, every
problem listed at once, nothing run when one is found). The jobs run one after the other in this
Slicer process: the inputs are loaded as MRML nodes, the module's Logic runs exactly as its Apply
button does (nodes -> the ``meddl`` command in a background process -> nodes), and the result
nodes are saved. Outputs go to a temporary name first and are renamed when complete, with the
same checksum records as ``meddl batch``: a re-run (of either) skips the jobs already done.

Exit status: 0 every job done or skipped, 1 one or more failed (see the report), 2 bad manifest
or arguments (nothing run), 130 interrupted.

The Logic supports the options its module panel has; a job using another option of the command
(``--combine each``, ``--donors``...) fails with a message saying so: run such manifests with
``meddl batch``. Only :func:`run_job_in_scene` touches MRML, so it is tested with the
``slicer-core`` wheel's ``vtkMRMLScene``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import meddl  # noqa: F401 - inside the Slicer extension the library sits beside the modules
except ImportError:  # the source tree: <repo>/MedDLExtension/meddl
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedDLExtension"))

from meddl import batch, io  # noqa: E402
from meddl.errors import Cancelled, InputError, MedDLError  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Options each branch below gives its Logic by name, besides the inputs and outputs it handles.
_SUPPORTED = {
    "adapt stain": {"method"},
    "adapt fourier": {"beta", "window"},
    "register": {"method", "similarity", "affine"},
    "reconstruct": {"method", "undersample", "acceleration", "center_fraction"},
    "segment": {"task"},
}
_ALWAYS = {"device", "progress", "seed", "debug", "help"}
#: options that change which files a job writes, beyond the one output a Logic imports
_OUTPUT_SHAPING = {"combine"}


def _other_options(job: batch.Job, args: argparse.Namespace, handled: set[str]) -> tuple[dict[str, Any], list[str]]:
    """Options of the command set to something other than their default, besides those handled:
    ``(by long name, for the Logic's **options; those it cannot take)``. The Logics take every option
    except those naming the files they write and read themselves (and ``--combine``, which writes
    one file per reference)."""
    from meddl.slicer_logic import _MANAGED_OPTIONS

    parser = batch.job_parser(job)
    allowed = _SUPPORTED.get(job.operation, set()) | handled | _ALWAYS
    passed, refused = {}, []
    for action in parser._actions:
        if not action.option_strings or action.dest in allowed:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        name = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[-1])
        key = name.lstrip("-").replace("-", "_")
        if key in _MANAGED_OPTIONS or key in _OUTPUT_SHAPING:
            refused.append(action.option_strings[-1])
        else:
            passed[key] = value
    return passed, refused


def _volume_node(path: str, scene, kind: str | None = None):
    from meddl import mrml

    return mrml.volume_to_node(io.read(path, kind=kind), scene, name=Path(path).name.split(".")[0])


def _segmentation_node(path: str, scene):
    from meddl import mrml

    return mrml.labels_to_segmentation_node(io.read(path, kind="label"), scene, name=Path(path).name.split(".")[0])


def _save_volume(node, path: str, kind: str | None = None) -> None:
    from meddl import mrml

    io.write(mrml.node_to_volume(node, kind=kind), path)


def run_job_in_scene(job: batch.Job, scene, outputs: Sequence[str], *, device: str = "auto",
                     seed: int | None = None, runner=None, progress: Callable[[float, str], None] | None = None) -> list:
    """Run one job through its module's Logic in ``scene`` and save the results to ``outputs``.

    Args:
        job: a manifest job (:class:`meddl.batch.Job`).
        scene: the ``vtkMRMLScene`` (``slicer.mrmlScene`` in the application).
        outputs: where to write the job's outputs, in :attr:`Job.outputs` order (temporary names).
        runner: the Logic's process runner (default: ``meddl`` in a background process).

    Returns the nodes this job added to the scene (inputs and results), so the caller can remove them.
    """
    from meddl import slicer_logic as logic

    args = batch.parse_job(job, outputs)
    seed = args.seed if getattr(args, "seed", None) is not None else seed
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    common = {"device": device, "seed": seed, "progress": progress}
    op = job.operation

    def check(handled: set[str]) -> None:
        extra, bad = _other_options(job, args, handled)
        if bad:
            raise InputError(f"{op}: the Slicer module does not take {', '.join(bad)}; run this job with "
                             "'meddl batch' (same manifest) instead")
        common.update(extra)  # every other option, by name, as the console gives it

    if op in ("adapt stain", "adapt fourier"):
        check({"output"})
        mode = op.split()[1]
        image = _volume_node(args.input, scene)
        refs = [_volume_node(r, scene) for r in ([args.reference] if mode == "stain" else args.references)]
        options = {"method": args.method} if mode == "stain" else {"beta": args.beta, "window": args.window}
        result = logic.AdaptationLogic(scene=scene, runner=runner).run(image, refs, mode=mode, output=True,
                                                                      **options, **common)
        _save_volume(result.output, args.output)
    elif op == "register":
        check({"output", "transform", "jacobian", "moving_labels", "labels_out"})
        from meddl import mrml, transforms

        fixed, moving = _volume_node(args.fixed, scene), _volume_node(args.moving, scene)
        labels = _segmentation_node(args.moving_labels, scene) if args.moving_labels else None
        result = logic.RegistrationLogic(scene=scene, runner=runner).run(
            fixed, moving, labels, method=args.method, similarity=args.similarity, prealignment=args.affine, warped=True,
            transform=bool(args.transform), jacobian=bool(args.jacobian), warped_segmentation=bool(args.labels_out),
            **common)
        _save_volume(result.warped, args.output)
        if args.transform:
            field = mrml.transform_node_to_displacement(result.transform, reference=mrml.node_to_volume(fixed))
            transforms.write_transform(field, args.transform)
        if args.jacobian:
            _save_volume(result.jacobian, args.jacobian)
        if args.labels_out:
            io.write(mrml.segmentation_node_to_labels(result.warped_segmentation, reference=fixed)[0], args.labels_out)
    elif op == "reconstruct":
        check({"output", "uncertainty", "zero_filled"})
        options = {k: v for k, v in (("acceleration", args.acceleration),
                                     ("center_fraction", args.center_fraction)) if v is not None}
        result = logic.ReconstructionLogic(scene=scene, runner=runner).run(
            args.kspace, method=args.method, undersampling=args.undersample, scene=scene,
            uncertainty=bool(args.uncertainty), zero_filled=bool(getattr(args, "zero_filled", None)),
            **options, **common)
        _save_volume(result.reconstruction, args.output)
        if args.uncertainty:
            _save_volume(result.uncertainty, args.uncertainty)
        if getattr(args, "zero_filled", None):
            _save_volume(result.zero_filled, args.zero_filled)
    elif op == "segment":
        check({"output", "context", "annotated"})
        target = _volume_node(args.target, scene)
        kwargs: dict[str, Any] = {"task": args.task, "output_mode": logic.SegmentOutput.NEW_VOLUME}
        if args.annotated:
            painted = _segmentation_node(args.annotated, scene)
            segments = painted.GetSegmentation()  # every painted label, as meddl segment does
            kwargs.update(segmentation=painted,
                          segment_id=[segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())])
        else:
            paths = list(args.context)
            if len(paths) % 2:
                raise InputError(f"segment: --context takes IMAGE LABEL pairs, got {len(paths)} paths")
            kwargs["context"] = [(_volume_node(paths[i], scene), _segmentation_node(paths[i + 1], scene))
                                 for i in range(0, len(paths), 2)]
        result = logic.InContextSegmentationLogic(scene=scene, runner=runner).run(target, **kwargs, **common)
        _save_volume(result.volume, args.output, kind="label")
    else:
        raise InputError(f"{op}: no Slicer module runs this operation; run this manifest with 'meddl batch'")
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(i).GetID() not in before]


def _remove_nodes(scene, nodes: Sequence) -> None:
    for node in nodes:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)


def run_manifest(manifest: batch.Manifest, scene, *, device: str = "auto", seed: int | None = None,
                 runner=None, log: Callable[[str], None] = print) -> batch.BatchReport:
    """Every job of a checked manifest, one after the other: skipped when complete and verified,
    else run in ``scene`` with temporary outputs that are committed only when the job succeeded."""
    started = time.perf_counter()
    results: list[batch.JobResult] = []
    batch.sweep_partial_files(p for j in manifest.jobs for p in j.outputs)
    manifest.state_dir.mkdir(parents=True, exist_ok=True)
    interrupted = False
    for n, job in enumerate(manifest.jobs, 1):
        res = batch.JobResult(job.id, job.line, job.operation, "failed", device=device, worker="slicer",
                              command=job.command_line())
        sums = batch.job_is_complete(job, manifest.state_dir)
        if sums is not None:
            res.status, res.outputs = "skipped", sums
            results.append(res)
            log(f"[{n}/{len(manifest.jobs)}] {job.id}: already complete")
            continue
        parts = batch.output_parts(job)
        t0 = time.perf_counter()
        added: list = []
        try:
            for p in parts:
                p.parent.mkdir(parents=True, exist_ok=True)
            added = run_job_in_scene(job, scene, [str(p) for p in parts], device=device, seed=seed, runner=runner)
            res.outputs = batch.commit_outputs(job, parts, manifest.state_dir, seconds=time.perf_counter() - t0,
                                               device=device)
            res.status = "done"
        except Cancelled as exc:
            res.status, res.error = "cancelled", str(exc)
        except KeyboardInterrupt:
            res.status, res.error, interrupted = "cancelled", "interrupted", True
        except (MedDLError, OSError) as exc:
            res.error = " ".join(str(exc).split())
        finally:
            batch.discard_parts(parts)
            _remove_nodes(scene, added)
        res.seconds = round(time.perf_counter() - t0, 4)
        results.append(res)
        log(f"[{n}/{len(manifest.jobs)}] {job.id}: {res.status}" + (f" ({res.error})" if res.error else ""))
        if interrupted:
            break
    done = {r.id for r in results}
    results += [batch.JobResult(j.id, j.line, j.operation, "cancelled", error="not run: interrupted",
                                command=j.command_line()) for j in manifest.jobs if j.id not in done]
    return batch.BatchReport(str(manifest.path), str(manifest.output_root), "slicer", 1,
                             time.perf_counter() - started, results, interrupted=interrupted)


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="Slicer --no-main-window --python-script batch.py --",
                                     description="Run a meddl manifest through the Slicer modules' Logic.")
    parser.add_argument("manifest")
    parser.add_argument("--output-root")
    parser.add_argument("--report")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int)
    return parser.parse_args(argv)


def main(argv: Sequence[str], scene=None, runner=None) -> int:
    """The script: check the manifest, run it, write the report; returns the exit status."""
    try:
        args = _arguments(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        manifest = batch.read_manifest(args.manifest, output_root=args.output_root, seed=args.seed)
    except InputError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_USAGE
    if scene is None:
        import slicer

        scene = slicer.mrmlScene
    report = run_manifest(manifest, scene, device=args.device, seed=args.seed, runner=runner)
    report.report_path = str(Path(args.report) if args.report else manifest.state_dir / "report.json")
    batch._write_json_atomic(Path(report.report_path), report.to_json())
    print(report.summary_line().replace("batch:", "slicer batch:", 1))
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED


def _script_arguments() -> list[str]:
    """What follows the script in ``Slicer ... --python-script batch.py -- ARGS`` (with or without ``--``)."""
    args = list(sys.argv[1:])
    return args[args.index("--") + 1:] if "--" in args else args


def _in_slicer_application() -> bool:
    return getattr(sys.modules.get("slicer"), "app", None) is not None


if __name__ == "__main__" or _in_slicer_application():
    status = main(_script_arguments())
    if _in_slicer_application():
        import slicer

        slicer.util.exit(status)
    else:  # e.g. run with PythonSlicer and the slicer-core wheel
        sys.exit(status)
