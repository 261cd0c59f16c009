"""Headless cohort processing: a manifest of jobs run on a Dask cluster, resumable, nothing lost.

A **manifest** (CSV or JSON Lines) has one job per row: an ``operation`` (``register``,
``reconstruct``, ``adapt stain``, ``adapt fourier``, ``segment``), its inputs, outputs and options
under the names of that subcommand's arguments (``fixed``, ``moving``, ``output``,
``center-fraction``...). Each row becomes the argument list of ``meddl <operation>`` and runs
through that subcommand's own parser and ``run(args, ctx)`` on a Dask worker, so every capability
that is part of the build works in batch with no extra code, and one that is not is reported.

Everything is checked before anything runs (:func:`read_manifest`), and every problem is
listed at once. Then (:func:`run_batch`):

* outputs are written under a temporary name beside the final one and renamed into place once
  the job succeeded; a job's checksums go to the state folder ``OUTPUT_ROOT/.meddl-batch/``
  last, so a job is complete exactly when its record is there and its outputs still hash to it;
* a re-run skips complete jobs (verified by their sha256) and redoes the rest;
* a failing job is reported and the others go on; a worker process that dies mid-job has its
  job rerun on another worker by Dask;
* an interrupt (Ctrl-C, or a :class:`~meddl.progress.CancelToken`) stops the running jobs at their
  next progress report, keeps the finished outputs and removes every partial file.

Relative input paths are relative to the manifest's folder; relative output paths to the output
root, and no output may leave it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import io as _stdio
import json
import logging
import math
import os
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import Cancelled, DependencyError, InputError, MedDLError
from .progress import CancelToken, Reporter

__all__ = [
    "Job",
    "Manifest",
    "JobResult",
    "BatchReport",
    "read_manifest",
    "run_batch",
    "execute_job",
    "register_operation",
    "operations",
    "job_is_complete",
    "parse_job",
    "job_parser",
    "output_parts",
    "commit_outputs",
    "discard_parts",
    "sweep_partial_files",
    "sha256_of",
    "worker_specs",
    "STATE_DIR",
]

log = logging.getLogger(__name__)

#: Folder inside the output root that holds one record (checksums) per finished job, and the report.
STATE_DIR = ".meddl-batch"
#: Seconds to wait for a scheduler given with ``--scheduler`` before giving up.
CONNECT_TIMEOUT_S = 5.0
#: Seconds running jobs get to stop at their next progress report after an interrupt.
CANCEL_GRACE_S = 10.0
#: Marker in the names of outputs being written (``.NAME.meddl-part-TOKEN.SUFFIX``).
_PART = ".meddl-part-"
_TOKEN_LENGTH = 12
#: Separator of several values in one CSV cell (arguments taking a list, such as references).
LIST_SEPARATOR = ";"

# Which arguments of a subcommand are files it writes, and which are files it reads beyond its
# positional arguments. A capability may say so itself with ``set_defaults(_outputs=(...),
# _inputs=(...))`` on its parser; these names are the ones the ``meddl`` commands use.
_OUTPUT_DESTS = frozenset({"output", "transform", "inverse", "jacobian", "labels_out", "uncertainty", "zero_filled",
                           "phase", "coils_out", "coil_images", "hematoxylin", "eosin", "probabilities",
                           "stains_out"})
_INPUT_DESTS = frozenset({"moving_labels", "fixed_labels", "context", "annotated", "weights", "deepsim_weights",
                          "mask", "reference", "references", "sensitivity_maps"})
#: Options the batch sets itself for every job.
_RESERVED = frozenset({"progress", "debug", "help"})
_DOUBLE_SUFFIXES = (".nii.gz", ".seg.nrrd", ".ome.tif", ".ome.tiff", ".tar.gz")

# operation command -> module holding its ``configure(subparsers)`` / ``run(args, ctx)``
_EXTRA_OPERATIONS: dict[str, str] = {}


def register_operation(command: str, module: str) -> None:
    """Make ``command`` (handled by ``module``'s ``configure``/``run``) available to manifests.

    The module is imported by name on the workers, so it must be importable there. The
    environment variable ``MEDDL_BATCH_OPERATIONS="cmd=module,cmd2=module2"`` does the same
    for a ``meddl batch`` process.
    """
    _EXTRA_OPERATIONS[command] = module


def operations() -> dict[str, str]:
    """Every operation command a manifest may name -> the module that handles it."""
    from . import cli

    ops = {name: module for name, module in cli.CAPABILITIES.items() if name != "batch"}
    for item in os.environ.get("MEDDL_BATCH_OPERATIONS", "").split(","):
        name, _, module = item.partition("=")
        if name.strip() and module.strip():
            ops[name.strip()] = module.strip()
    ops.update(_EXTRA_OPERATIONS)
    return ops


def _module_available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):
        return False


@cache
def _parser_for(command: str, module: str):
    """``(parser, subparser)``: a ``meddl`` parser holding just this operation's subcommand."""
    from . import cli

    parser = cli.Parser(prog="meddl")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=cli.Parser)
    importlib.import_module(module).configure(sub)
    if command not in sub.choices:
        raise MedDLError(f"operation '{command}': module '{module}' does not define that subcommand")
    return parser, sub.choices[command]


# -- manifest -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One manifest row, checked and turned into the argument list of its subcommand.

    Attributes:
        id: the row's ``id``, or its first output relative to the output root.
        line: the manifest line it came from (1-based; a CSV header is line 1).
        operation: as written, e.g. ``"adapt fourier"``.
        command: the subcommand, e.g. ``"adapt"``; ``module`` handles it.
        argv: the arguments after the subcommand (absolute paths, ``--name=value`` options).
        outputs: absolute output paths; ``output_slots`` are where each sits in ``argv``
            (index, prefix before the path).
        inputs: absolute input paths.
        key: fingerprint of the operation and its arguments (names the job's state record).
        accepts: which of the common options (``device``, ``progress``) the subcommand takes.
        derived: further files the job writes under names made from its outputs (``OUT_1.nii.gz``
            for one output per reference, ``PREFIX_H.nrrd`` for a prefix), as the subcommand's
            ``_derived_outputs`` default names them; checked like outputs.
    """

    id: str
    line: int
    operation: str
    command: str
    module: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    output_slots: tuple[tuple[int, str], ...]
    inputs: tuple[str, ...]
    key: str
    accepts: tuple[str, ...] = ("device", "progress")
    derived: tuple[str, ...] = ()

    def argv_with(self, outputs: Sequence[str]) -> list[str]:
        """``argv`` with the outputs replaced by ``outputs`` (same order as :attr:`outputs`)."""
        argv = list(self.argv)
        for (index, prefix), path in zip(self.output_slots, outputs, strict=True):
            argv[index] = prefix + str(path)
        return argv

    def command_line(self) -> str:
        """The equivalent ``meddl`` command (for the report and for rerunning one job by hand)."""
        import shlex

        return shlex.join(["meddl", self.command, *self.argv])


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: its jobs and the folders paths were resolved against."""

    path: Path
    output_root: Path
    jobs: tuple[Job, ...]

    @property
    def state_dir(self) -> Path:
        return self.output_root / STATE_DIR


def _norm(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_").lower()


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The manifest's rows as ``(line, {column: value})``; raises for a file that is neither format."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"cannot read manifest '{path}': no such file") from None
    except IsADirectoryError:
        raise InputError(f"cannot read manifest '{path}': it is a folder; expected a CSV or JSON Lines file") from None
    except PermissionError:
        raise InputError(f"cannot read manifest '{path}': permission denied") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"manifest '{path}': expected a CSV or JSON Lines text file, got binary data") from None
    if "\x00" in text:
        raise InputError(f"manifest '{path}': expected a CSV or JSON Lines text file, got binary data")
    if not text.strip():
        raise InputError(f"manifest '{path}': the file is empty; expected one job per row")
    suffix = path.suffix.lower()
    first = next(ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")) if any(
        ln.strip() and not ln.lstrip().startswith("#") for ln in text.splitlines()) else ""
    if suffix in (".jsonl", ".ndjson", ".json") or (suffix not in (".csv", ".tsv") and first.lstrip().startswith("{")):
        return _json_rows(path, text)
    return _csv_rows(path, text, "\t" if suffix == ".tsv" else ",")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; give a finite value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a number; give a finite value")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"the key {', '.join(repr(k) for k in twice)} is given twice")
    return dict(pairs)


def _json_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            obj = json.loads(stripped, parse_constant=_no_constant, parse_float=_finite_float,
                             object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            bad.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except ValueError as exc:
            bad.append(f"line {number}: {exc}")
            continue
        if not isinstance(obj, dict):
            bad.append(f"line {number}: expected a JSON object, got {type(obj).__name__}")
            continue
        rows.append((number, obj))
    if bad and not rows:
        raise InputError(f"manifest '{path}': expected JSON Lines (one JSON object per line) or CSV; "
                         + "; ".join(bad[:5]))
    if bad:
        raise InputError(f"manifest '{path}': {len(bad)} problem(s): " + "; ".join(bad))
    if not rows:
        raise InputError(f"manifest '{path}': no jobs; expected one JSON object per line")
    return rows


def _csv_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    lines = [ln for ln in text.splitlines(keepends=True)]
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise InputError(f"manifest '{path}': expected a CSV header row, got none ({exc})") from None
    names = [_norm(h) for h in header]
    if "operation" not in names:
        raise InputError(
            f"manifest '{path}': expected CSV with a header row naming the columns (one of them 'operation') "
            f"or JSON Lines, got a first row of {header[:4]!r}"
        )
    dupes = sorted({n for n in names if names.count(n) > 1 and n})
    if dupes:
        raise InputError(f"manifest '{path}': column(s) {', '.join(dupes)} appear more than once in the header")
    rows, bad = [], []
    try:
        for cells in reader:
            number = reader.line_num
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue
            if len(cells) != len(names):
                bad.append(f"line {number}: expected {len(names)} columns like the header, got {len(cells)}")
                continue
            rows.append((number, {n: c.strip() for n, c in zip(names, cells, strict=True) if n and c.strip() != ""}))
    except csv.Error as exc:
        raise InputError(f"manifest '{path}': not valid CSV at line {reader.line_num} ({exc})") from None
    if bad:
        raise InputError(f"manifest '{path}': {len(bad)} problem(s): " + "; ".join(bad))
    if not rows:
        raise InputError(f"manifest '{path}': no jobs; expected one row per job under the header")
    return rows


def _truthy(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y"):
        return True
    if text in ("0", "false", "no", "off", "n", ""):
        return False
    raise InputError(f"{what}: expected true or false, got {value!r}")


def _as_list(value: Any, csv_cell: bool) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if csv_cell and isinstance(value, str):
        return [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
    return [str(value)]


def _scalar(value: Any, what: str) -> str:
    if isinstance(value, (list, tuple, dict)):
        raise InputError(f"{what}: expected one value, got {type(value).__name__}")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _takes_list(action) -> bool:
    return action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1


def _resolve(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return (p if p.is_absolute() else base / p).resolve()


def _suffix_of(name: str) -> str:
    lower = name.lower()
    for s in _DOUBLE_SUFFIXES:
        if lower.endswith(s):
            return name[-len(s):]
    return Path(name).suffix


def _stem_of(name: str) -> str:
    suffix = _suffix_of(name)
    return name[: len(name) - len(suffix)] if suffix else name


def _build_job(line: int, row: dict[str, Any], manifest_dir: Path, root: Path, seed: int | None,
               csv_source: bool, ops: Mapping[str, str]) -> tuple[Job | None, list[str]]:
    """One row -> ``(job, what is wrong with it)``; the job is None when its operation is unknown
    (its paths are still checked by the caller when it has one, problems or not)."""
    import argparse
    from argparse import SUPPRESS

    where = f"line {line}"
    raw = {_norm(k): v for k, v in row.items() if v is not None and v != ""}
    operation = " ".join(str(raw.pop("operation", "")).split())
    job_id = str(raw.pop("id", "")).strip()
    if not operation:
        return None, [f"{where}: no operation; expected one of {_operation_names(ops)}"]
    command, *leading = operation.split(" ")
    if command not in ops:
        return None, [f"{where}: unknown operation '{operation}'; expected one of {_operation_names(ops)}"]
    module = ops[command]
    if not _module_available(module):
        return None, [f"{where}: operation '{operation}' is not available in this build"]
    try:
        _, sub = _parser_for(command, module)
    except (ImportError, MedDLError) as exc:
        return None, [f"{where}: operation '{operation}' is not available in this build ({exc})"]
    argv: list[str] = []
    leading = list(leading)
    while True:  # "adapt fourier": a command with its own subcommands
        nested = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
        if nested is None:
            break
        if not leading or leading[0] not in nested.choices:
            return None, [f"{where}: unknown operation '{operation}'; expected one of {_operation_names(ops)}"]
        argv.append(leading[0])
        sub = nested.choices[leading.pop(0)]
    outputs_dests = set(sub.get_default("_outputs") or _OUTPUT_DESTS)
    inputs_dests = set(sub.get_default("_inputs") or _INPUT_DESTS)

    positionals = [a for a in sub._actions if not a.option_strings and a.dest != SUPPRESS]
    optionals = [a for a in sub._actions if a.option_strings and a.dest not in ("help", SUPPRESS)]
    by_name: dict[str, Any] = {}
    for a in optionals:
        by_name.setdefault(_norm(a.dest), a)
        for s in a.option_strings:
            by_name.setdefault(_norm(s), a)

    errors: list[str] = []
    slots: list[tuple[int, str]] = []
    out_paths: list[Path] = []
    in_paths: list[Path] = []

    def add_path(action, value: str, prefix: str) -> str:
        if action.dest in outputs_dests:
            path = _resolve(value, root)
            slots.append((len(argv), prefix))
            out_paths.append(path)
            return str(path)
        if action.dest in inputs_dests or (not action.option_strings and not action.choices):
            path = _resolve(value, manifest_dir)
            in_paths.append(path)
            return str(path)
        return value

    used: set[str] = set()
    missing_positional = False
    for action in positionals:
        name = _norm(action.dest)
        if leading and action.choices:
            if name in raw:
                errors.append(f"'{name}' is given by the operation '{operation}' already")
            argv.append(leading.pop(0))
            used.add(name)
            continue
        if name not in raw:
            if action.nargs in ("?", "*"):
                continue
            errors.append(f"'{operation}' needs '{name}'")
            missing_positional = True
            continue
        used.add(name)
        values = _as_list(raw[name], csv_source) if _takes_list(action) else [_scalar(raw[name], name)]
        for v in values:
            argv.append(add_path(action, v, ""))
    if leading:
        errors.append(f"unknown operation '{operation}'; expected one of {_operation_names(ops)}")

    if seed is not None and "seed" not in raw and "seed" in by_name:
        raw["seed"] = seed
    valid = sorted({_norm(a.option_strings[-1]).replace("_", "-") for a in optionals if _norm(a.dest) not in _RESERVED}
                   | {_norm(a.dest) for a in positionals})
    for key in [k for k in raw if k not in used]:
        action = by_name.get(key)
        if action is None or _norm(action.dest) in _RESERVED:
            errors.append(f"unknown option '{key}' for '{operation}'; expected one of {', '.join(valid)}")
            continue
        value = raw[key]
        flag = action.option_strings[-1]
        kind = type(action).__name__
        try:
            if kind in ("_StoreTrueAction", "_StoreFalseAction", "_StoreConstAction", "BooleanOptionalAction"):
                if _truthy(value, key):
                    argv.append(flag)
                elif kind == "BooleanOptionalAction":
                    argv.append("--no-" + flag.lstrip("-"))
            elif kind == "_CountAction":
                argv.extend([flag] * int(value))
            elif _takes_list(action) or kind in ("_AppendAction", "_ExtendAction"):
                values = _as_list(value, csv_source)
                if kind == "_AppendAction":
                    for v in values:
                        argv.append(f"{flag}={add_path(action, v, flag + '=')}")
                else:
                    argv.append(flag)
                    for v in values:
                        argv.append(add_path(action, v, ""))
            else:
                text = _scalar(value, key)
                argv.append(f"{flag}={add_path(action, text, flag + '=')}")
        except (InputError, ValueError) as exc:
            errors.append(str(exc))

    derived: tuple[str, ...] = ()
    if not missing_positional:  # argparse names only the first problem it meets: after ours
        parser, _ = _parser_for(command, module)
        try:
            parsed = parser.parse_args([command, *argv])
            derive = getattr(parsed, "_derived_outputs", None)
            if derive is not None:
                derived = tuple(str(p) for p in derive(parsed) if str(p) not in {str(o) for o in out_paths})
        except MedDLError as exc:
            errors.append(str(exc).replace("(see 'meddl --help')", "").strip())
        except SystemExit:  # argparse's own exit (should not happen with meddl's parser)
            errors.append("the arguments do not parse")
    if not out_paths and not errors:
        errors.append(f"'{operation}' writes no output; expected an 'output' column")
    if not job_id:
        first = out_paths[0] if out_paths else None
        job_id = (str(first.relative_to(root)) if first.is_relative_to(root) else str(first)) if first is not None \
            else f"line {line}"
    key = hashlib.sha256(json.dumps([command, argv]).encode()).hexdigest()
    accepts = tuple(name for name in ("device", "progress") if name in by_name)
    job = Job(job_id, line, operation, command, module, tuple(argv), tuple(str(p) for p in out_paths),
              tuple(slots), tuple(str(p) for p in in_paths), key, accepts, derived)
    return job, [f"{where}: {e}" for e in errors]


def _operation_names(ops: Mapping[str, str]) -> str:
    """``register, adapt stain, adapt fourier, ...``: the subcommands of those in the build, else the names."""
    import argparse

    names = []
    for name, module in ops.items():
        nested = None
        if _module_available(module):
            with contextlib.suppress(Exception):
                _, sub = _parser_for(name, module)
                nested = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
        if nested is not None:
            names.extend(f"{name} {choice}" for choice in nested.choices)
        else:
            names.extend(["adapt stain", "adapt fourier"] if name == "adapt" else [name])
    return ", ".join(names)


def _check_input(path: Path) -> str | None:
    if not path.exists():
        if not path.suffix and path.with_name(path.name + ".cfl").is_file():
            return None  # BART data named without a suffix, as bart names it (NAME.cfl + NAME.hdr)
        return f"input '{path}' does not exist"
    if path.is_dir():
        return None if os.access(path, os.R_OK | os.X_OK) else f"input '{path}' is not readable (permission denied)"
    if not os.access(path, os.R_OK):
        return f"input '{path}' is not readable (permission denied)"
    if path.stat().st_size == 0:
        return f"input '{path}' is empty"
    return None


def _check_output(path: Path, root: Path) -> str | None:
    if not path.is_relative_to(root):
        return f"output '{path}' is outside the output root '{root}'; give --output-root or a path inside it"
    if path.is_relative_to(root / STATE_DIR):
        return f"output '{path}' is inside the batch state folder {STATE_DIR}; choose another path"
    if path.is_dir():
        return f"output '{path}' is a folder; expected a file path"
    if path.exists() and not os.access(path, os.W_OK):
        return f"output '{path}' exists and is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"output '{path}': '{parent}' is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"output '{path}' cannot be written: folder '{parent}' is not writable"
    return None


def read_manifest(path: str | os.PathLike, output_root: str | os.PathLike | None = None,
                  seed: int | None = None) -> Manifest:
    """Read and check a manifest; raise :class:`InputError` listing every problem found.

    Args:
        path: a CSV file (header row naming the columns, one of them ``operation``; list values
            separated by ``;``) or JSON Lines (one object per line; lists as JSON arrays).
        output_root: the folder every output must stay in (default: the manifest's folder);
            relative outputs are relative to it.
        seed: a ``--seed`` for rows that do not give one.

    Checked: the format; each row's operation exists and is in this build; its options are
    those of the subcommand and parse; inputs exist and are readable; outputs are writable,
    inside the output root, not an input, and written by no other job.
    """
    from .io import DETACHED_SUFFIXES, files_of

    path = Path(path)
    rows = _rows(path)
    csv_source = not _is_jsonl(path)
    manifest_dir = path.resolve().parent
    root = _resolve(str(output_root), Path.cwd()) if output_root is not None else manifest_dir
    if root.exists() and not root.is_dir():
        raise InputError(f"--output-root '{root}': expected a folder, got a file")
    ops = operations()
    problems: list[tuple[int, str]] = []
    jobs: list[Job] = []
    for line, row in rows:
        job, errors = _build_job(line, row, manifest_dir, root, seed, csv_source, ops)
        problems.extend((line, e) for e in errors)
        if job is not None:
            jobs.append(job)
    writers: dict[str, Job] = {}
    ids: dict[str, Job] = {}
    for job in jobs:
        where = f"line {job.line}"
        if job.id in ids and ids[job.id].outputs[:1] != job.outputs[:1]:  # else: reported as a shared output
            problems.append((job.line, f"{where}: job id '{job.id}' is also used on line {ids[job.id].line}"))
        ids.setdefault(job.id, job)
        for p in job.inputs:
            problem = _check_input(Path(p))
            if problem:
                problems.append((job.line, f"{where}: {problem}"))
        input_files = {str(f) for i in job.inputs for f in files_of(i)}
        for p in (*job.outputs, *job.derived):
            if p == str(path.resolve()):
                problems.append((job.line, f"{where}: output '{p}' is the manifest itself"))
                continue
            if p in job.inputs:
                problems.append((job.line, f"{where}: output '{p}' is also an input of this job "
                                           "(inputs are never overwritten)"))
                continue
            clash = next((str(f) for f in files_of(p, written=True) if str(f) in input_files), None)
            if clash is not None:
                what = (f"output '{p}' is a file of an input of this job (the other half of a pair, or a header's "
                        "data file)" if clash == p else f"output '{p}' would overwrite '{clash}', a file of an "
                        "input of this job")
                problems.append((job.line, f"{where}: {what} (inputs are never overwritten)"))
                continue
            if p in writers:
                other = writers[p]
                problems.append((job.line, f"{where}: output '{p}' is "
                                           + ("given twice" if other is job else f"also written by line {other.line}")))
                continue
            writers[p] = job
            if p.lower().endswith(DETACHED_SUFFIXES):  # io's detached-header formats
                problems.append((job.line, f"{where}: output '{p}': a detached header names its data file, which "
                                           "the rename into place would leave behind; use .nrrd or .mha"))
                continue
            problem = _check_output(Path(p), root)
            if problem:
                problems.append((job.line, f"{where}: {problem}"))
    # every file the jobs write (a pair's other half, a header's data file included)
    touched = {str(f): job for p, job in writers.items() for f in files_of(p, written=True)}
    for job in jobs:
        for p in job.inputs:
            hit = next((str(f) for f in files_of(p) if str(f) in touched and touched[str(f)] is not job), None)
            if hit is not None:
                what = f"input '{p}'" if hit == p else f"input '{p}' (its file '{hit}')"
                problems.append((job.line, f"line {job.line}: {what} is written by line {touched[hit].line}; jobs "
                                           "run in any order, so split the manifest in two and run one after the other"))
    if problems:
        problems.sort(key=lambda item: item[0])
        raise InputError(f"manifest '{path}': {len(problems)} problem(s), nothing was run: "
                         + "; ".join(text for _, text in problems))
    return Manifest(path.resolve(), root, tuple(jobs))


def _is_jsonl(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return False
    if suffix in (".jsonl", ".ndjson", ".json"):
        return True
    text = path.read_text(encoding="utf-8-sig")
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    return first.lstrip().startswith("{")


# -- state: checksums, completeness, partial files ----------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_path(state_dir: Path, job: Job) -> Path:
    return state_dir / "jobs" / f"{job.key[:40]}.json"


def job_is_complete(job: Job, state_dir: str | os.PathLike) -> dict[str, str] | None:
    """The output checksums if ``job`` finished before and its outputs still verify, else None."""
    record = _record_path(Path(state_dir), job)
    try:
        saved = json.loads(record.read_text())
        sums = saved["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(sums, dict) or not sums:  # the record's name is the job's fingerprint
        return None
    for p, digest in sums.items():
        try:
            if sha256_of(p) != digest:
                return None
        except OSError:
            return None
    return dict(sums)


def _write_json_atomic(path: Path, obj: Any) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def _part_marker(part_name: str) -> str:
    """``.NAME.meddl-part-TOKEN`` of a temporary name (whatever suffix follows)."""
    at = part_name.rfind(_PART)  # the last: an output's own name may hold the marker too
    if at < 0:
        return part_name
    return part_name[: at + len(_PART) + _TOKEN_LENGTH]


def _part_name(final: Path) -> Path:
    name = final.name
    return final.with_name(f".{_stem_of(name)}{_PART}{uuid.uuid4().hex[:_TOKEN_LENGTH]}{_suffix_of(name)}")


def sweep_partial_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the partial files a killed or interrupted job left beside these outputs."""
    removed = []
    by_dir: dict[Path, set[str]] = {}
    for p in paths:
        p = Path(p)
        marker = _stem_of(p.name) + _PART
        by_dir.setdefault(p.parent, set()).update(("." + marker, ".." + marker))
    for folder, markers in by_dir.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            # ours, or the temporary file meddl.io.atomic_path made inside one of ours
            if entry.name.startswith(tuple(markers)) and entry.is_file():
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


# -- on the worker ------------------------------------------------------------------------------

_CANCELLED_RUNS: set[str] = set()
_WORKER_LOCK = threading.Lock()
_WORKER_STATE: dict[str, Any] = {"prepared": False, "model_loads": 0}


def _cancel_run(run_id: str) -> None:
    """Runs on every worker (``client.run``) when the client is interrupted."""
    _CANCELLED_RUNS.add(run_id)


class _RunToken(CancelToken):
    """Cancelled when this run is cancelled on this worker process."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self._run_id = run_id

    @property
    def cancelled(self) -> bool:
        return self._run_id in _CANCELLED_RUNS or super().cancelled

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled: the batch was interrupted")


def _install_model_cache() -> None:
    """Load each model file once per worker process, not once per job.

    ``meddl.models.load_state_dict`` (the sha256 check and the unpickling, the costly part of
    :func:`meddl.models.load_model`) is wrapped by a cache keyed by the file, its size and
    modification time; each call gets its own dict (networks copy the tensors in
    ``load_state_dict``), so a job changing its network cannot change the next job's.
    """
    from . import models

    if getattr(models.load_state_dict, "_meddl_batch_cache", False):
        return
    original = models.load_state_dict
    cache: dict[tuple, dict] = {}

    def load_state_dict(weights, card=None, map_location="cpu"):
        p = Path(weights)
        try:
            st = p.stat()
            key = (str(p.resolve()), st.st_size, st.st_mtime_ns, getattr(card, "sha256", None), str(map_location))
        except OSError:
            return original(weights, card, map_location)
        with _WORKER_LOCK:
            hit = cache.get(key)
        if hit is None:
            hit = original(weights, card, map_location)
            with _WORKER_LOCK:
                cache[key] = hit
                _WORKER_STATE["model_loads"] += 1
        return dict(hit)

    load_state_dict._meddl_batch_cache = True  # type: ignore[attr-defined]
    models.load_state_dict = load_state_dict


def _prepare_worker(settings: Mapping[str, Any]) -> None:
    with _WORKER_LOCK:
        first = not _WORKER_STATE["prepared"]
        _WORKER_STATE["prepared"] = True
    if first:
        _install_model_cache()
    import torch  # the first time: here rather than in the first job's time

    threads = settings.get("torch_threads")
    if threads and torch.get_num_threads() != int(threads):
        # per job: OpenMP's thread count belongs to the calling thread, and Dask may run the
        # next job on another thread of its pool
        torch.set_num_threads(int(threads))


def dask_setup(worker) -> None:
    """Preload hook of the embedded cluster's workers (``preload=["meddl.batch"]``).

    Ctrl-C reaches every process of the terminal's process group, workers included; they ignore
    it, so that the client stops the run cleanly (running jobs end at their next progress report).
    """
    import signal

    with contextlib.suppress(ValueError):  # only possible in the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _produced(final: Path, part: Path) -> list[tuple[Path, Path]]:
    """``(written, final)`` pairs for one output slot: the temporary file itself, and files the
    operation named after it (``OUT_1.nii.gz`` for several outputs, ``PREFIX_H.nrrd`` for a prefix)."""
    marker = _part_marker(part.name)  # the final's suffix may be none (a prefix such as "p")
    stem = _stem_of(final.name)
    pairs = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(part.parent):
            if entry.name.startswith(marker) and entry.is_file():
                pairs.append((Path(entry.path), final.with_name(stem + entry.name[len(marker):])))
    return sorted(pairs)


def output_parts(job: Job) -> list[Path]:
    """Fresh temporary names for the job's outputs (same folder and suffix), in :attr:`Job.outputs` order."""
    return [_part_name(Path(p)) for p in job.outputs]


def commit_outputs(job: Job, parts: Sequence[Path], state_dir: str | os.PathLike, *, seconds: float = 0.0,
                   device: str = "") -> dict[str, str]:
    """Checksum what the job wrote under ``parts``, rename it onto the final names, then write the
    job's record (which makes it complete). Returns ``{final path: sha256}``."""
    finals = [Path(p) for p in job.outputs]
    produced = [_produced(f, p) for f, p in zip(finals, parts, strict=True)]
    missing = [str(f) for f, pairs in zip(finals, produced, strict=True) if not pairs]
    if missing:
        raise MedDLError(f"meddl {job.operation} finished without writing {', '.join(missing)}")
    pairs = [pair for group in produced for pair in group]
    sums = {str(final): sha256_of(written) for written, final in pairs}
    for written, final in pairs:
        os.replace(written, final)
    record = {"id": job.id, "operation": job.operation, "command": job.command_line(), "outputs": sums,
              "seconds": round(seconds, 4), "device": device, "finished": time.time()}
    _write_json_atomic(_record_path(Path(state_dir), job), record)
    return sums


def discard_parts(parts: Sequence[Path]) -> None:
    """Remove whatever is left under these temporary names (a failed or cancelled job)."""
    for part in parts:
        marker = _part_marker(part.name)
        with contextlib.suppress(OSError):
            for entry in os.scandir(part.parent):
                # ours, and what meddl.io.atomic_path made from ours (".<ours>.XXXX.part.nii.gz")
                if entry.name.startswith((marker, "." + marker)):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


def parse_job(job: Job, outputs: Sequence[str | os.PathLike] | None = None, device: str | None = None):
    """The job's arguments parsed by its subcommand's parser (outputs replaced by ``outputs``),
    as ``meddl`` would see them with ``--progress none``."""
    parser, _ = _parser_for(job.command, job.module)
    argv = [job.command, *(job.argv_with([str(p) for p in outputs]) if outputs is not None else job.argv)]
    if device is not None and "device" in job.accepts and not any(a.startswith("--device=") for a in job.argv):
        argv.append(f"--device={device}")  # a row's own --device wins
    if "progress" in job.accepts:
        argv.append("--progress=none")
    return parser.parse_args(argv)


def job_parser(job: Job):
    """The (innermost) parser of the job's subcommand, e.g. that of ``adapt fourier``."""
    import argparse

    _, sub = _parser_for(job.command, job.module)
    for token in job.operation.split()[1:]:
        nested = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
        if nested is None or token not in nested.choices:
            break
        sub = nested.choices[token]
    return sub


def _context(args):
    """The RunContext ``meddl`` itself would give this subcommand."""
    from . import cli

    if getattr(args, "_compute", True) and hasattr(args, "device") and hasattr(args, "progress"):
        ctx, _bar = cli.make_context(args)  # progress "none": no bar
        return ctx
    return cli.RunContext(Reporter(), "cpu", "no computation", None, "none")


def execute_job(job: Job, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job where this is called (a Dask worker): the subcommand's ``run(args, ctx)`` on
    temporary output names, then checksums, rename into place, and the job's state record.

    Never raises for a failing job: returns ``{"status": "done"|"failed"|"cancelled", ...}``.
    ``settings``: ``run_id``, ``state_dir``, ``device``, ``torch_threads``.
    """
    from . import cli

    _prepare_worker(settings)
    started = time.perf_counter()
    token = _RunToken(settings["run_id"])
    finals = [Path(p) for p in job.outputs]
    parts = output_parts(job)
    result: dict[str, Any] = {"id": job.id, "status": "failed", "device": "", "worker": _worker_name(),
                              "error": "", "outputs": {}, "pid": os.getpid()}
    try:
        token.check()
        for p in finals:
            p.parent.mkdir(parents=True, exist_ok=True)
        args = parse_job(job, parts, device=settings.get("device", "auto"))
        ctx = _context(args)
        ctx.reporter = Reporter(None, token)
        ctx.stdout = _stdio.StringIO()
        result["device"] = str(ctx.device)
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            result["gpu"] = os.environ["CUDA_VISIBLE_DEVICES"]
        code = cli._run_on_device(args, ctx)  # a GPU out-of-memory error reruns on the CPU
        result["device"] = str(ctx.device)
        if code != 0:
            raise MedDLError(f"meddl {job.operation} ended with exit code {code}")
        # finished: commit even if an interrupt came meanwhile (it takes milliseconds)
        sums = commit_outputs(job, parts, settings["state_dir"], seconds=time.perf_counter() - started,
                              device=result["device"])
        result.update(status="done", outputs=sums)
    except Cancelled as exc:
        result.update(status="cancelled", error=_one_line(exc))
    except MedDLError as exc:
        result["error"] = _one_line(exc)
    except KeyboardInterrupt:
        result.update(status="cancelled", error="interrupted")
    except Exception as exc:  # noqa: BLE001 - a bug in the operation: reported with its traceback
        result["error"] = f"internal error ({type(exc).__name__}: {_one_line(exc)})"
        result["traceback"] = traceback.format_exc()
    finally:
        discard_parts(parts)
    result["seconds"] = round(time.perf_counter() - started, 4)
    result["model_loads"] = _WORKER_STATE["model_loads"]
    return result


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- the client side ----------------------------------------------------------------------------


@dataclass
class JobResult:
    """One line of the report."""

    id: str
    line: int
    operation: str
    status: str  # done | skipped | failed | cancelled
    seconds: float = 0.0
    device: str = ""
    worker: str = ""
    error: str = ""
    outputs: dict[str, str] = field(default_factory=dict)  # path -> sha256
    command: str = ""
    traceback: str | None = None


@dataclass
class BatchReport:
    """What a batch run did: one :class:`JobResult` per job, counts and timing."""

    manifest: str
    output_root: str
    scheduler: str
    workers: int
    seconds: float
    jobs: list[JobResult]
    report_path: str | None = None
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(1 for j in self.jobs if j.status == status)

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(j.status in ("done", "skipped") for j in self.jobs)

    def summary(self) -> dict[str, Any]:
        return {"jobs": len(self.jobs), "done": self.count("done"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "cancelled": self.count("cancelled")}

    def summary_line(self) -> str:
        s = self.summary()
        ran = s["done"] + s["failed"]
        rate = f", {ran / self.seconds:.2f} jobs/s" if ran and self.seconds > 0 else ""
        text = (f"batch: {s['jobs']} jobs: {s['done']} done, {s['skipped']} skipped (already complete), "
                f"{s['failed']} failed, {s['cancelled']} not finished in {self.seconds:.1f} s{rate} "
                f"on {self.workers} worker(s)")
        return text + (f"; report {self.report_path}" if self.report_path else "")

    def to_json(self) -> dict[str, Any]:
        jobs = []
        for j in self.jobs:
            d = asdict(j)
            if d["traceback"] is None:
                del d["traceback"]
            jobs.append(d)
        return {"manifest": self.manifest, "output_root": self.output_root, "scheduler": self.scheduler,
                "workers": self.workers, "seconds": round(self.seconds, 3), "interrupted": self.interrupted,
                "summary": self.summary(), "jobs": jobs}


def _visible_gpus() -> list[str]:
    """The GPUs this process may use (ids as CUDA_VISIBLE_DEVICES names them), without starting CUDA here."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        return []


def worker_specs(n_workers: int, threads_per_worker: int, gpus: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Dask ``SpecCluster`` worker specs: one Nanny process per worker; with GPUs, each worker
    sees one device (``CUDA_VISIBLE_DEVICES``), round-robin when there are more workers than GPUs."""
    from distributed import Nanny

    specs = {}
    for i in range(n_workers):
        env = {"CUDA_VISIBLE_DEVICES": str(gpus[i % len(gpus)])} if gpus else {}
        specs[f"meddl-{i}"] = {"cls": Nanny, "options": {"nthreads": threads_per_worker, "env": env,
                                                         "silence_logs": logging.ERROR,
                                                         "preload": ["meddl.batch"]}}
    return specs


def compute_threads(n_workers: int, threads_per_worker: int) -> int:
    """Threads for numpy/torch in each job of an embedded cluster: the cores shared among the jobs
    running at once (Dask's own default is 1, for clusters that run many small tasks per worker), or
    fewer when the user's ``OMP_NUM_THREADS`` says so (as it does for a single ``meddl`` command)."""
    shared = max(1, (os.cpu_count() or 1) // (n_workers * threads_per_worker))
    try:
        asked = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return shared
    return max(1, min(shared, asked))


def cluster_environment(threads: int) -> dict[str, Any]:
    """Dask settings for the embedded cluster's worker processes (set before each one starts,
    a restarted one included): ``threads`` for OpenMP/MKL/OpenBLAS, and glibc's default memory
    trimming instead of Dask's ``MALLOC_TRIM_THRESHOLD_=65536``, which makes every large array
    a fresh ``mmap`` and volume-sized jobs about 30-60 % slower."""
    environ: dict[str, Any] = {f"distributed.nanny.pre-spawn-environ.{name}": str(threads)
                               for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    environ["distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"] = None
    return environ


def _start_cluster(n_workers: int, threads_per_worker: int, gpus: Sequence[str]):
    import dask
    from distributed import LocalCluster, Scheduler, SpecCluster

    # no dashboard; the scheduler's HTTP endpoint (health, metrics) on a free port rather than 8787, so
    # two batches at once (or a batch beside another Dask cluster) do not collide
    common = {"dashboard": False, "dashboard_address": ":0", "host": "127.0.0.1"}
    environ = cluster_environment(compute_threads(n_workers, threads_per_worker))
    with dask.config.set(environ):
        if not gpus:
            return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                                silence_logs=logging.ERROR, preload=["meddl.batch"], dashboard_address=None,
                                host="127.0.0.1", scheduler_kwargs=common)
        return SpecCluster(workers=worker_specs(n_workers, threads_per_worker, gpus),
                           scheduler={"cls": Scheduler, "options": common}, silence_logs=logging.ERROR)


def _connect(address: str, timeout: float):
    from distributed import Client

    if "://" not in address and ":" not in address:
        raise InputError(f"--scheduler: expected an address like tcp://host:8786, got '{address}'")
    started = time.perf_counter()
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        waited = time.perf_counter() - started
        raise InputError(
            f"--scheduler {address}: cannot reach a Dask scheduler there (gave up after {waited:.0f} s: "
            f"{_one_line(exc)[:160]}); check the address, or leave --scheduler out to run on this machine"
        ) from exc
    except ValueError as exc:
        raise InputError(f"--scheduler: expected an address like tcp://host:8786, got '{address}' ({exc})") from exc


def _dask():
    try:
        import distributed
    except ImportError as exc:
        raise DependencyError("meddl batch: needs dask.distributed; install it with "
                              "pip install 'dask[distributed]' (or meddl[batch])") from exc
    return distributed


def run_batch(
    manifest: Manifest | str | os.PathLike,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    device: str = "auto",
    seed: int | None = None,
    output_root: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    progress: Reporter | Callable[[float, str], None] | None = None,
    cancel: CancelToken | None = None,
    log: Callable[[str], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    on_result: Callable[[JobResult], None] | None = None,
) -> BatchReport:
    """Run every job of a manifest on a Dask cluster and write the JSON report.

    Args:
        manifest: a :class:`Manifest` or the path of one (read with :func:`read_manifest`).
        scheduler: address of a running Dask scheduler (``tcp://host:8786``); default: start a
            local cluster of ``workers`` processes (one per GPU when there are GPUs, else one per
            CPU core, at most one per job) and close it at the end.
        threads_per_worker: jobs each worker runs at the same time.
        device: ``--device`` for every job (rows may set their own); resolved on the workers.
        report: where the JSON report goes (default ``OUTPUT_ROOT/.meddl-batch/report.json``).
        progress: called with (fraction of jobs finished, message).
        cancel: a token; cancelling it stops the batch like Ctrl-C.
        on_result: called on this thread with each job's result as it arrives.

    Returns the :class:`BatchReport`. Raises :class:`InputError` for a bad manifest or an
    unreachable scheduler (before anything ran) and :class:`Cancelled` after an interrupt (the
    report is written first).
    """
    from .device import DeviceName

    started = time.perf_counter()
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest, output_root=output_root, seed=seed)
    base = str(device).split(":", 1)[0].strip().lower()
    if base not in {d.value for d in DeviceName}:
        raise InputError(f"--device: expected auto, cpu, cuda, cuda:N or mps, got '{device}'")
    if workers is not None and workers < 1:
        raise InputError(f"--workers: expected 1 or more, got {workers}")
    if threads_per_worker < 1:
        raise InputError(f"--threads-per-worker: expected 1 or more, got {threads_per_worker}")
    report_path = Path(report) if report is not None else manifest.state_dir / "report.json"
    resolved = str(report_path.resolve())
    if resolved in {str(Path(p)) for j in manifest.jobs for p in (*j.outputs, *j.derived)}:
        raise InputError(f"--report '{report_path}': it is also an output of a job; choose another path")
    if resolved in {str(Path(p)) for j in manifest.jobs for p in j.inputs} or resolved == str(manifest.path):
        raise InputError(f"--report '{report_path}': it is "
                         + ("the manifest" if resolved == str(manifest.path) else "an input of a job")
                         + "; inputs are never overwritten, choose another path")
    if report_path.is_dir():
        raise InputError(f"--report '{report_path}': it is a folder; expected a file name such as report.json")
    distributed = _dask()
    reporter = Reporter.of(progress)
    say = log or (lambda message: None)
    manifest.state_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, JobResult] = {}
    pending: list[Job] = []
    for job in manifest.jobs:
        sums = job_is_complete(job, manifest.state_dir)
        if sums is not None:
            results[job.id] = JobResult(job.id, job.line, job.operation, "skipped", outputs=sums,
                                        command=job.command_line())
        else:
            pending.append(job)
    sweep_partial_files(p for j in manifest.jobs for p in j.outputs)  # left by a killed run
    total = len(manifest.jobs)
    finished = len(results)
    if finished:
        say(f"{finished} of {total} jobs already complete and verified; running the other {len(pending)}")
    reporter(finished / total if total else 1.0, f"{finished}/{total} jobs")

    client = cluster = None
    run_id = ""
    n_workers = 0
    interrupted = False
    where = scheduler or "local"
    by_key: dict[str, Job] = {}
    futures: list = []
    try:
        if pending:
            gpus = _visible_gpus() if base in ("auto", "cuda") and scheduler is None else []
            if scheduler is not None:
                client = _connect(scheduler, connect_timeout)
                n_workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
                threads = None
            else:
                cpus = os.cpu_count() or 1
                default = len(gpus) if gpus else max(1, cpus // threads_per_worker)
                n_workers = workers if workers is not None else max(1, min(default, len(pending)))
                say(f"starting a local Dask cluster: {n_workers} worker(s) x {threads_per_worker} thread(s)"
                    + (f", GPUs {', '.join(gpus)}" if gpus else ""))
                cluster = _start_cluster(n_workers, threads_per_worker, gpus)
                client = distributed.Client(cluster, set_as_default=False)
                threads = compute_threads(n_workers, threads_per_worker)
            run_id = uuid.uuid4().hex
            settings = {"run_id": run_id, "state_dir": str(manifest.state_dir), "device": device,
                        "torch_threads": threads}
            for job in pending:
                fut = client.submit(execute_job, job, settings, key=f"meddl-{job.id[:40]}-{job.key[:8]}-{run_id[:8]}",
                                    pure=False)
                by_key[fut.key] = job
                futures.append(fut)
            arrived: queue.Queue = queue.Queue()
            for fut in futures:
                fut.add_done_callback(arrived.put)
            for _ in range(len(futures)):
                fut = None
                while fut is None:
                    if cancel is not None and cancel.cancelled:
                        raise KeyboardInterrupt
                    with contextlib.suppress(queue.Empty):
                        fut = arrived.get(timeout=0.2)
                res = _collect(fut, by_key[fut.key])
                results[res.id] = res
                finished += 1
                if on_result is not None:
                    on_result(res)
                failed = sum(1 for r in results.values() if r.status == "failed")
                reporter(finished / total, f"{finished}/{total} jobs" + (f", {failed} failed" if failed else ""))
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: stopping the running jobs (finished outputs are kept)")
        if client is not None and futures:
            results.update(_stop(client, futures, by_key, run_id, results))
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
        # workers killed mid-write, or an interrupt: no partial file survives the run
        sweep_partial_files(p for j in pending for p in j.outputs)

    jobs = []
    for job in manifest.jobs:
        r = _settled(job, results.get(job.id), manifest.state_dir) if interrupted else results.get(job.id)
        r = r or JobResult(job.id, job.line, job.operation, "cancelled", error="not run: the batch was interrupted")
        r.command = job.command_line()
        jobs.append(r)
    out = BatchReport(str(manifest.path), str(manifest.output_root), where, n_workers,
                      time.perf_counter() - started, jobs, str(report_path), interrupted)
    _write_json_atomic(report_path, out.to_json())
    if interrupted:
        raise Cancelled(f"meddl batch: interrupted; {out.count('done') + out.count('skipped')} of {total} jobs "
                        f"complete (report {report_path}); run the same command again to finish the rest")
    return out


def _settled(job: Job, result: JobResult | None, state_dir: Path) -> JobResult | None:
    """After an interrupt: a job the client saw no answer from (or saw cancelled) that nonetheless
    committed its outputs on a worker, with its record, is reported done, as a rerun would find it."""
    if result is not None and result.status != "cancelled":
        return result
    sums = job_is_complete(job, state_dir)
    if sums is None:
        return result
    return JobResult(job.id, job.line, job.operation, "done", outputs=sums)


def _collect(fut, job: Job) -> JobResult:
    """A finished future -> JobResult (a worker that died too often, or any other error, is a failure)."""
    try:
        res = fut.result()
    except Exception as exc:  # noqa: BLE001 - KilledWorker, CancelledError, a lost scheduler
        name = type(exc).__name__
        if name == "KilledWorker":
            message = "the worker process died while running this job, each time it was tried (out of memory?)"
        elif name == "CancelledError":
            return JobResult(job.id, job.line, job.operation, "cancelled", error="cancelled")
        else:
            message = f"{name}: {_one_line(exc)}"
        return JobResult(job.id, job.line, job.operation, "failed", error=message)
    device = res.get("device", "") + (f" (CUDA_VISIBLE_DEVICES={res['gpu']})" if res.get("gpu") else "")
    return JobResult(job.id, job.line, job.operation, res["status"], seconds=float(res.get("seconds", 0.0)),
                     device=device, worker=res.get("worker", ""), error=res.get("error", ""),
                     outputs=dict(res.get("outputs", {})), traceback=res.get("traceback"))


def _stop(client, futures, by_key: Mapping[str, Job], run_id: str, have: Mapping[str, JobResult]) -> dict[str, JobResult]:
    """After an interrupt: tell the workers to stop, give running jobs a moment to end cleanly
    (those that finish are kept), cancel the rest."""
    import distributed

    out: dict[str, JobResult] = {}
    with contextlib.suppress(Exception):
        client.run(_cancel_run, run_id, wait=True)
    not_started = [f for f in futures if f.status == "pending" and by_key[f.key].id not in have]
    with contextlib.suppress(Exception):
        # queued jobs would return "cancelled" at once; do not wait on them
        client.cancel(not_started)
    running = [f for f in futures if f.status == "pending"]
    deadline = time.perf_counter() + CANCEL_GRACE_S
    while running and time.perf_counter() < deadline:
        with contextlib.suppress(Exception):
            distributed.wait(running, timeout=0.25)
        running = [f for f in running if f.status == "pending"]
    with contextlib.suppress(Exception):
        client.cancel(running)
    for fut in futures:
        job = by_key[fut.key]
        if job.id in have:
            continue
        if fut.status in ("finished", "error"):
            out[job.id] = _collect(fut, job)
    return out
