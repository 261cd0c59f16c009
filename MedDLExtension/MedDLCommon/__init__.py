"""What the four MedDL Slicer modules share on the application side (Qt and Slicer allowed here).

* :mod:`MedDLCommon.widget` - the module widget base: ``.ui`` loading, typed parameter node,
  Apply / Cancel, progress bar and status from the background ``meddl`` process.
* :mod:`MedDLCommon.dependencies` - installing what the process needs on first Apply, with the
  user's consent: torch through the PyTorch extension, the rest with ``slicer.util.pip_install``
  constrained so that Slicer's own numpy and SimpleITK are never replaced.
* :mod:`MedDLCommon.sampledata` - the offline samples of :mod:`meddl.data` in the Sample Data module.

No computation happens here: the Logic classes live in :mod:`meddl.slicer_logic`.
"""

from .dependencies import ensureDependencies, missingPackages
from .sampledata import loadSample, registerSampleData
from .widget import DEVICES, MedDLModuleWidget

__all__ = ["DEVICES", "MedDLModuleWidget", "ensureDependencies", "missingPackages", "loadSample", "registerSampleData"]
