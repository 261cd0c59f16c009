"""MedDL Registration: learned deformable registration of a moving volume onto a fixed volume.

The computation runs in a background ``meddl register`` process (see meddl.slicer_logic);
this file holds the module description, the widget and the self-test only.
"""

from typing import Annotated

import slicer
from meddl.errors import MedDLError
from meddl.slicer_logic import Prealignment, RegistrationLogic, RegistrationMethod, Similarity, choices
from MedDLCommon import DEVICES, MedDLModuleWidget, registerSampleData
from slicer import vtkMRMLGridTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)


class MedDLRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedDL Registration"
        self.parent.categories = ["MedDL"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDLExtension developers"]
        self.parent.helpText = """
Deformable registration of a <b>moving</b> volume onto a <b>fixed</b> volume with a learned network,
instance optimisation, or both. Outputs: the warped moving volume, the displacement field as a grid
transform (apply it to the moving volume in the Data or Transforms module), its Jacobian determinant
(values &lt;= 0 mark folding) and, when a moving segmentation is given, the warped segmentation.
<br>Similarity: LNCC for the same modality, MI, MIND or DeepSim across modalities.
<br>The work runs in a background process: Slicer stays responsive and Cancel stops it at once.
The same engine is available on the command line as <code>meddl register</code>.
"""
        self.parent.acknowledgementText = """
Part of MedDLExtension. Local normalised cross-correlation and mutual information are the classic
registration similarities; DeepSim follows Czolbe et al., "DeepSim: Semantic similarity metrics for learned
image registration", MIDL 2021. Sample data: the MNI152 template shipped with nilearn.
"""
        # The samples serve all four MedDL modules; registered once the application is up.
        slicer.app.connect("startupCompleted()", registerSampleData)


@parameterNodeWrapper
class MedDLRegistrationParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: vtkMRMLSegmentationNode
    method: Annotated[str, Choice(choices(RegistrationMethod))] = RegistrationMethod.NETWORK_AND_OPTIMISATION.value
    similarity: Annotated[str, Choice(choices(Similarity))] = Similarity.LNCC.value
    prealignment: Annotated[str, Choice(choices(Prealignment))] = Prealignment.AFFINE.value
    device: Annotated[str, Choice(DEVICES)] = "auto"
    warpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLGridTransformNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    warpedSegmentation: vtkMRMLSegmentationNode
    inverseTransform: vtkMRMLGridTransformNode


class MedDLRegistrationWidget(MedDLModuleWidget):
    applyToolTip = "Register the moving volume onto the fixed volume"

    def createLogic(self):
        return MedDLRegistrationLogic()

    def cannotApplyReason(self):
        p = self._parameterNode
        if not p.fixedVolume or not p.movingVolume:
            return "Select a fixed and a moving volume"
        if p.fixedVolume == p.movingVolume:
            return "The fixed and moving volumes must differ"
        inputs = (p.fixedVolume, p.movingVolume)
        if p.warpedVolume in inputs or p.jacobianVolume in inputs:
            return "An output volume is also an input; choose or create another one"
        return ""

    def startJob(self, progress, log):
        p = self._parameterNode
        return self.logic.start(
            p.fixedVolume, p.movingVolume, p.movingSegmentation,
            method=p.method, similarity=p.similarity, prealignment=p.prealignment, device=p.device,
            warped=p.warpedVolume if p.warpedVolume else True,
            transform=p.outputTransform if p.outputTransform else True,
            jacobian=p.jacobianVolume if p.jacobianVolume else False,
            warped_segmentation=p.warpedSegmentation if p.warpedSegmentation else True,
            inverse_transform=p.inverseTransform if p.inverseTransform else False,
            progress=progress, log=log)

    def onJobFinished(self, outputs):
        p = self._parameterNode
        p.warpedVolume = outputs.warped
        p.outputTransform = outputs.transform
        if outputs.jacobian is not None:
            p.jacobianVolume = outputs.jacobian
        if outputs.warped_segmentation is not None:
            p.warpedSegmentation = outputs.warped_segmentation
        if outputs.inverse_transform is not None:
            p.inverseTransform = outputs.inverse_transform
        self.showVolume(outputs.warped)


class MedDLRegistrationLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """Usable without the widget, e.g. from the Python console::

        logic = slicer.util.getModuleLogic("MedDLRegistration")
        result = logic.run(fixedNode, movingNode, method="optimisation", device="cpu")
        result.warped, result.transform

    See ``meddl.slicer_logic.RegistrationLogic`` for every option.
    """

    def __init__(self, runner=None):
        ScriptedLoadableModuleLogic.__init__(self)
        RegistrationLogic.__init__(self, slicer.mrmlScene, runner)

    def getParameterNode(self):
        return MedDLRegistrationParameterNode(super().getParameterNode())


class MedDLRegistrationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RegistrationOfShiftedBlob()

    def test_RegistrationOfShiftedBlob(self):
        """Register a shifted Gaussian blob; the warped volume must be on the fixed grid."""
        import numpy as np
        from meddl import mrml
        from meddl.volume import Volume, affine_from_geometry

        self.delayDisplay("Starting the test")
        grid = np.stack(np.meshgrid(*[np.arange(24.0)] * 3, indexing="ij"))
        affine = affine_from_geometry([2.0, 2.0, 2.0], [-24.0, -24.0, -24.0])

        def blob(centre):
            r2 = sum((grid[i] - centre[i]) ** 2 for i in range(3))
            return Volume(np.exp(-r2 / 30.0)[None].astype(np.float32) * 100, affine)

        fixed = mrml.volume_to_node(blob((12, 12, 12)), slicer.mrmlScene, name="fixed")
        moving = mrml.volume_to_node(blob((14, 11, 12)), slicer.mrmlScene, name="moving")
        try:
            result = MedDLRegistrationLogic().run(fixed, moving, method="optimisation", device="cpu", timeout=600)
        except MedDLError as exc:
            if "not available" in str(exc):
                self.delayDisplay(f"Registration is not part of this build: {exc}")
                return
            raise
        self.assertEqual(result.warped.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertIsNotNone(result.transform)
        self.delayDisplay("Test passed")
