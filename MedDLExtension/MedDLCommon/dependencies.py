"""Python packages the background ``meddl`` process needs inside Slicer, installed on first Apply.

torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build matching the
GPU driver. Everything else goes through ``slicer.util.pip_install`` with a constraints file
that pins the numpy and SimpleITK Slicer bundles, so pip can never upgrade or replace them
(Slicer's own modules are built against those versions). Nothing is installed without the
user's consent (``slicer.util.confirmOkCancelDisplay``).

``slicer`` is imported inside the functions, so the package lists can be checked without Slicer.
"""

import importlib.metadata
import importlib.util
import inspect
import logging
import os
import tempfile

#: import name -> pip requirement, for every module (the library's own dependencies besides torch).
REQUIREMENTS = {
    "scipy": "scipy>=1.10",
    "tqdm": "tqdm>=4.60",
    "h5py": "h5py>=3.8",
}

#: what building the offline samples needs, by sample source (see meddl.data).
SAMPLE_REQUIREMENTS = {
    "nilearn": {"nilearn": "nilearn>=0.10", "nibabel": "nibabel>=5"},
    "skimage": {"skimage": "scikit-image>=0.21"},
    "dipy": {"dipy": "dipy>=1.7"},
}

#: distributions Slicer bundles: pinned to the installed version whenever pip runs.
PINNED = ("numpy", "SimpleITK")

#: oldest torch the library supports.
MINIMUM_TORCH = (2, 2)


def missingPackages(requirements):
    """The pip requirements (values of ``requirements``) whose import name cannot be found."""
    return [spec for name, spec in requirements.items() if importlib.util.find_spec(name) is None]


def constraintsText():
    """pip constraints pinning the bundled packages to the versions installed now."""
    lines = []
    for dist in PINNED:
        try:
            lines.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def torchVersion():
    """The installed torch version as a tuple, or None; read from metadata (importing torch is slow)."""
    try:
        text = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def runShowingError(message, function):
    """``(True, function())``, or ``(False, None)`` after showing the error.

    ``slicer.util.tryWithErrorDisplay`` shows the error (with a wait cursor meanwhile) and then raises
    it again: callers that should stop quietly after the dialog (a Qt slot, a loader that returns
    None) use this instead of repeating the try/except around it.
    """
    import slicer

    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            return True, function()
    except Exception:
        return False, None


def ensureTorch(askConfirmation=True):
    """Install torch through the PyTorch extension if needed; True when a usable torch is there."""
    import slicer

    version = torchVersion()
    if version is not None:
        if version < MINIMUM_TORCH:
            slicer.util.errorDisplay(
                f"PyTorch {'.'.join(map(str, version))} is installed; MedDL needs "
                f"{'.'.join(map(str, MINIMUM_TORCH))} or newer. Update it in the PyTorch Utils module "
                "(uninstall, restart Slicer, install) and try again.")
            return False
        return True
    try:
        import PyTorchUtils
    except ImportError:
        slicer.util.errorDisplay("MedDL needs the PyTorch extension: install it with the Extensions Manager, "
                                 "restart Slicer and try again.")
        return False
    logic = PyTorchUtils.PyTorchUtilsLogic()
    options = {"askConfirmation": askConfirmation}
    try:
        accepted = inspect.signature(logic.installTorch).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "torchVersionRequirement" in accepted:  # without it, it may pick an older torch that suits the GPU driver
        options["torchVersionRequirement"] = ">=" + ".".join(map(str, MINIMUM_TORCH))
    ok, torch = runShowingError("MedDL: installing PyTorch failed.", lambda: logic.installTorch(**options))
    if not ok or torch is None:
        return False
    importlib.invalidate_caches()
    return torchVersion() is not None and ensureTorch(askConfirmation=False)


def pipInstall(requirements):
    """``slicer.util.pip_install`` with the bundled packages pinned."""
    import slicer

    if not requirements:
        return
    fd, constraints = tempfile.mkstemp(prefix="meddl-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(constraintsText())
        logging.info(f"MedDL: pip install {' '.join(requirements)} (constraints: {constraintsText().split()})")
        slicer.util.pip_install([*requirements, "--constraint", constraints])
    finally:
        os.remove(constraints)


def ensureDependencies(extra=None, what="MedDL"):
    """Make sure torch and ``REQUIREMENTS`` (plus ``extra``) are installed; ask before installing.

    Returns True when everything is there, False when the user declined or an install failed
    (the reason has been shown).
    """
    import slicer

    wanted = {**REQUIREMENTS, **(extra or {})}
    missing = missingPackages(wanted)
    needTorch = torchVersion() is None
    if not missing and not needTorch:
        return ensureTorch(askConfirmation=False)
    listed = (["torch (through the PyTorch extension)"] if needTorch else []) + missing
    if not slicer.util.confirmOkCancelDisplay(
            f"{what} needs Python packages that are not installed yet:\n\n  " + "\n  ".join(listed)
            + "\n\nInstall them now? This downloads them from the Python Package Index and may take a few "
            "minutes. Slicer's own numpy and SimpleITK are left as they are.",
            windowTitle=f"{what}: install dependencies"):
        return False
    if needTorch and not ensureTorch(askConfirmation=False):
        return False
    installed, _ = runShowingError(f"{what}: installing {', '.join(missing)} failed.", lambda: pipInstall(missing))
    if not installed:
        return False
    importlib.invalidate_caches()
    still = missingPackages(wanted)
    if still:
        slicer.util.errorDisplay(f"{what}: these packages are still missing after installation: {', '.join(still)}")
        return False
    return True
