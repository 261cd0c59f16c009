"""A test-only operation for ``meddl batch`` (no tests here): ``sleepcopy INPUT -o OUTPUT``.

It plugs in like a capability (``configure(subparsers)`` / ``run(args, ctx)``) and is registered
with ``meddl.batch.register_operation("sleepcopy", "test_batch_ops")`` or the environment variable
``MEDDL_BATCH_OPERATIONS=sleepcopy=test_batch_ops``. It takes ``--seconds`` (reporting progress,
so it can be cancelled), writes the input's bytes followed by ``--tag`` to the output, records
each execution in the ``--log`` folder (``NAME.PID.start`` holding the PID and the worker's address,
``.end``) so tests can count runs and kill the worker that runs a job, and fails on ``--fail``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from meddl.cli import common_options
from meddl.errors import InputError


def configure(subparsers) -> None:
    p = subparsers.add_parser("sleepcopy", parents=[common_options()], help="test operation")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--tag", default="")
    p.add_argument("--fail", action="store_true")
    p.add_argument("--log", help="folder receiving one file per execution")
    p.add_argument("--mode", choices=("fast", "slow"), default="fast")
    p.set_defaults(_run=run)


def run(args, ctx) -> int:
    name = Path(args.input).name
    stamp = None
    if args.log:
        stamp = Path(args.log) / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        from meddl.batch import _worker_name

        stamp.with_suffix(".start").write_text(f"{os.getpid()} {_worker_name()}")
    steps = max(1, int(args.seconds / 0.05))
    for i in range(steps):
        ctx.reporter(i / steps, "sleeping")
        time.sleep(args.seconds / steps)
    if args.fail:
        raise InputError(f"sleepcopy: expected no --fail, got it for '{name}'")
    data = Path(args.input).read_bytes() + args.tag.encode()
    with open(args.output, "wb") as f:  # deliberately not atomic: the batch must make it so
        f.write(data[: len(data) // 2])
        f.flush()
        f.write(data[len(data) // 2:])
    if stamp is not None:
        stamp.with_suffix(".end").write_text(str(os.getpid()))
    return 0
