"""Device choice and the out-of-memory fallback."""

from __future__ import annotations

import pytest
import torch
from meddl.device import resolve_device, run_with_fallback
from meddl.errors import InputError


def test_auto_reports_what_it_picked():
    choice = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert choice.device.type == expected
    assert choice.reason.startswith("auto:")


def test_cpu_is_always_available():
    assert resolve_device("cpu").device == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cuda-0", ""])
def test_unknown_device_is_a_clear_error(spec):
    with pytest.raises(InputError, match=r"--device: expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["cuda:abc", "cuda:", "cpu:0", "auto:1", "cuda:\u00b2"])
def test_malformed_device_index_is_refused_before_looking_for_a_gpu(spec):
    with pytest.raises(InputError, match=rf"--device: expected .* cuda:N \(N a GPU number\) or mps, got '{spec}'"):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_a_clear_error():
    with pytest.raises(InputError, match=r"no CUDA GPU is available here"):
        resolve_device("cuda")


def test_gpu_out_of_memory_falls_back_to_cpu_with_a_warning():
    calls = []

    def step(device):
        calls.append(torch.device(device).type)
        if torch.device(device).type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.ones(2, device=device).sum().item()

    with pytest.warns(RuntimeWarning, match=r"ran out of memory; falling back to the CPU"):
        result, used = run_with_fallback(step, torch.device("cuda"), "test step")
    assert result == 2.0 and used.type == "cpu" and calls == ["cuda", "cpu"]


def test_other_errors_are_not_swallowed():
    def step(device):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        run_with_fallback(step, torch.device("cuda"))
    with pytest.raises(RuntimeError, match="out of memory"):
        run_with_fallback(lambda d: (_ for _ in ()).throw(RuntimeError("out of memory")), torch.device("cpu"))
    # a device still named, not resolved ("auto", as a batch with --scheduler passes it): the real error
    with pytest.raises(ValueError, match="a real bug"):
        run_with_fallback(step, "auto")


def test_every_compute_command_reruns_on_the_cpu_after_a_gpu_out_of_memory(capsys):
    import argparse

    from meddl.cli import RunContext, _run_on_device
    from meddl.progress import Reporter

    devices = []

    def run(args, ctx):
        devices.append(str(ctx.device))
        if ctx.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        ctx.summary("done")
        return 0

    ctx = RunContext(Reporter(), torch.device("cuda"), "asked", None, "text")
    with pytest.warns(RuntimeWarning, match=r"meddl segment: CUDA ran out of memory; falling back to the CPU"):
        assert _run_on_device(argparse.Namespace(_run=run, command="segment"), ctx) == 0
    assert devices == ["cuda", "cpu"]
    out = capsys.readouterr().out
    assert "rerunning on the CPU" in out and "device=cpu" in out
