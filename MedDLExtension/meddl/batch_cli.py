"""``meddl batch``: run a manifest of jobs on a Dask cluster (see :mod:`meddl.batch`)."""

from __future__ import annotations

from .cli import EXIT_OK, common_options

__all__ = ["configure", "run"]

#: Exit status when the batch ran but one or more jobs failed (the report names them).
EXIT_JOBS_FAILED = 1

_EPILOG = """\
manifest: CSV with a header row, or JSON Lines; one job per row. Columns: 'operation' (register,
reconstruct, adapt stain, adapt fourier, adapt histogram, adapt classwise, segment), an optional 'id', then the arguments of that
command by name: positional ones by their name (fixed, moving, input, references, ...), options
without the dashes (output, method, center-fraction, ...). Several values in one CSV cell are
separated by ';'. Relative inputs are relative to the manifest, relative outputs to --output-root.

example (CSV):
  operation,input,references,output,beta
  adapt fourier,scans/a.nii.gz,ref/atlas.nii.gz,adapted/a.nii.gz,0.02

Rerunning the same command skips the jobs whose outputs are complete and verified (sha256) and
runs the rest. Exit status: 0 all jobs done, 1 some failed (see the report), 2 bad manifest or
options (nothing run), 130 interrupted.
"""


def configure(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "batch", parents=[common_options()], help="run a manifest of jobs on a Dask cluster (resumable)",
        description="Run every job of a manifest (CSV or JSON Lines) on a Dask cluster: an embedded local "
                    "cluster by default, or an existing one with --scheduler.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="CSV or JSON Lines file, one job per row")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running Dask scheduler (tcp://host:8786); default: a local cluster")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of the local cluster (default: one per GPU, else one per CPU core, "
                        "at most one per job)")
    p.add_argument("--threads-per-worker", type=int, default=1, metavar="N",
                   help="jobs each worker runs at once (default 1)")
    p.add_argument("--report", metavar="OUT.json",
                   help="JSON report (default: OUTPUT_ROOT/.meddl-batch/report.json)")
    p.add_argument("--output-root", metavar="DIR",
                   help="folder all outputs must stay in; relative outputs are relative to it "
                        "(default: the manifest's folder)")
    # with an existing cluster the device is the workers' business, not this machine's
    p.set_defaults(_run=run, _defer_device=lambda a: bool(a.scheduler))


def run(args, ctx) -> int:
    from .batch import run_batch

    report = run_batch(
        args.manifest,
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        device=args.device,
        seed=args.seed,
        output_root=args.output_root,
        report=args.report,
        progress=ctx.reporter,
        log=ctx.log,
        on_result=lambda r: _announce(r, ctx),
    )
    if ctx.progress_mode == "json":
        ctx.summary("batch", **report.summary(), report=report.report_path)
    else:
        ctx.log(report.summary_line())
    return EXIT_OK if report.ok else EXIT_JOBS_FAILED


def _announce(result, ctx) -> None:
    """A failed job is worth a line while the batch goes on."""
    if result.status == "failed":
        ctx.log(f"job {result.id} (line {result.line}) failed: {result.error}")
