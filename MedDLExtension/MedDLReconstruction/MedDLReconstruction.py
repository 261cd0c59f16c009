"""MedDL Reconstruction: MRI images from raw multi-coil k-space (fastMRI / ISMRMRD HDF5 files, BART .cfl).

The computation runs in a background ``meddl reconstruct`` process (see meddl.slicer_logic);
this file holds the module description, the widget and the self-test only.
"""

import pathlib
from typing import Annotated

import slicer
from meddl.errors import MedDLError
from meddl.slicer_logic import ReconstructionLogic, ReconstructionMethod, Undersampling, choices
from MedDLCommon import DEVICES, MedDLModuleWidget
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)


class MedDLReconstruction(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedDL Reconstruction"
        self.parent.categories = ["MedDL"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDLExtension developers"]
        self.parent.helpText = """
Reconstruct an MR image from raw multi-coil k-space stored in an HDF5 file (fastMRI layout, ISMRMRD header) or in BART's .cfl/.hdr pair.
Methods: <b>auto</b> (the default: the learned network or TV compressed sensing, whichever predicts
held-out k-space lines of this file better; the network above 6x), a learned end-to-end variational
network (<b>varnet</b>: the best image quality in our benchmark of brain images, and fast), compressed
sensing with <b>tv</b> or <b>l1-wavelet</b> regularisation, the <b>zero-filled</b> inverse FFT and
<b>cg-sense</b>. Fully sampled files get the direct reconstruction.
Fully sampled data can be undersampled retrospectively (equispaced or random lines, acceleration R,
centre fraction) to see what an accelerated scan would give. Optional outputs: the zero-filled image, a
per-voxel uncertainty map, the phase of the complex image and the per-coil images as a sequence.
<br>The work runs in a background process; the command line equivalent is <code>meddl reconstruct</code>.
"""
        self.parent.acknowledgementText = """
Part of MedDLExtension. The variational network follows Sriram et al., "End-to-End Variational Networks for
Accelerated MRI Reconstruction", MICCAI 2020; file layout and masks follow the fastMRI dataset
(Zbontar et al., arXiv:1811.08839). SENSE: Pruessmann et al., MRM 1999.
"""


@parameterNodeWrapper
class MedDLReconstructionParameterNode:
    kspaceFile: pathlib.Path
    repetition: Annotated[int, WithinRange(-1, 9999)] = -1  # -1: all repetitions
    method: Annotated[str, Choice(choices(ReconstructionMethod))] = ReconstructionMethod.AUTO.value
    undersample: bool = False
    undersampling: Annotated[str, Choice(choices(Undersampling))] = Undersampling.EQUISPACED.value
    acceleration: Annotated[float, WithinRange(1.0, 32.0)] = 4.0
    centerFraction: Annotated[float, WithinRange(0.0, 0.5)] = 0.0  # 0: auto, the command's 0.32 / R
    device: Annotated[str, Choice(DEVICES)] = "auto"
    reconstructionVolume: vtkMRMLScalarVolumeNode
    zeroFilledVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    phaseVolume: vtkMRMLScalarVolumeNode
    coilImages: bool = False


class MedDLReconstructionWidget(MedDLModuleWidget):
    applyToolTip = "Reconstruct the image from the k-space file"

    def createLogic(self):
        return MedDLReconstructionLogic()

    def setupConnections(self):
        self.ui.kspacePathLineEdit.connect("currentPathChanged(QString)", self._showHeader)
        self.ui.undersampleCheckBox.connect("toggled(bool)", self._updateUndersamplingWidgets)

    def updateGUIFromParameterNode(self):
        self._showHeader(self.ui.kspacePathLineEdit.currentPath)
        self._updateUndersamplingWidgets(self._parameterNode.undersample)

    def _showHeader(self, path):
        text = ReconstructionLogic.header_text(path) if path else ""
        self.ui.headerTextEdit.setPlainText(text)

    def _updateUndersamplingWidgets(self, enabled):
        for widget in (self.ui.undersamplingComboBox, self.ui.accelerationSpinBox, self.ui.centerFractionSpinBox):
            widget.enabled = enabled

    def cannotApplyReason(self):
        path = self._parameterNode.kspaceFile
        if not path or not path.is_file():
            return "Choose a k-space file (.h5, or BART .cfl)"
        return ""

    def startJob(self, progress, log):
        p = self._parameterNode
        return self.logic.start(
            p.kspaceFile, method=p.method, device=p.device,
            undersampling=p.undersampling if p.undersample else None,
            acceleration=p.acceleration, center_fraction=p.centerFraction or None,
            reconstruction=p.reconstructionVolume if p.reconstructionVolume else True,
            zero_filled=p.zeroFilledVolume if p.zeroFilledVolume else False,
            uncertainty=p.uncertaintyVolume if p.uncertaintyVolume else False,
            phase=p.phaseVolume if p.phaseVolume else False,
            coil_images=p.coilImages,
            repetition=p.repetition if p.repetition >= 0 else None,
            progress=progress, log=log)

    def onJobFinished(self, outputs):
        p = self._parameterNode
        p.reconstructionVolume = outputs.reconstruction
        self.showVolume(outputs.reconstruction)


class MedDLReconstructionLogic(ScriptedLoadableModuleLogic, ReconstructionLogic):
    """Usable without the widget::

        result = slicer.util.getModuleLogic("MedDLReconstruction").run("/data/file1000001.h5", method="cg-sense")

    See ``meddl.slicer_logic.ReconstructionLogic`` for every option.
    """

    def __init__(self, runner=None):
        ScriptedLoadableModuleLogic.__init__(self)
        ReconstructionLogic.__init__(self, slicer.mrmlScene, runner)

    def getParameterNode(self):
        return MedDLReconstructionParameterNode(super().getParameterNode())


class MedDLReconstructionTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ZeroFilledReconstructionOfSyntheticKspace()

    def test_ZeroFilledReconstructionOfSyntheticKspace(self):
        """A small synthetic two-coil k-space file reconstructs to one image of the right size."""
        import os
        import tempfile

        import numpy as np

        self.delayDisplay("Starting the test")
        rng = np.random.default_rng(0)
        kspace = (rng.normal(size=(1, 2, 32, 24)) + 1j * rng.normal(size=(1, 2, 32, 24))).astype(np.complex64)
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "synthetic.h5")
        try:
            from meddl.reconstruction.fastmri import write_fastmri  # with the ismrmrd_header a file needs

            write_fastmri(path, kspace)
        except ImportError as exc:
            self.delayDisplay(f"Reconstruction is not part of this build: {exc}")
            return
        try:
            result = MedDLReconstructionLogic().run(path, method="zero-filled", device="cpu", timeout=600)
        except MedDLError as exc:
            if "not available" in str(exc):
                self.delayDisplay(f"Reconstruction is not part of this build: {exc}")
                return
            raise
        self.assertIsNotNone(result.reconstruction.GetImageData())
        self.delayDisplay("Test passed")
