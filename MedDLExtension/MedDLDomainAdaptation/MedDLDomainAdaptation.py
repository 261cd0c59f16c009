"""MedDL Domain Adaptation: stain normalisation of histology slides and Fourier domain adaptation.

The computation runs in a background ``meddl adapt`` process (see meddl.slicer_logic);
this file holds the module description, the widget and the self-test only.
"""

from typing import Annotated, Union

import qt
import slicer
from meddl.errors import MedDLError
from meddl.slicer_logic import AdaptationLogic, AdaptMode, FourierDomain, FourierWindow, StainMethod, choices
from MedDLCommon import DEVICES, MedDLModuleWidget
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLVectorVolumeNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)


class MedDLDomainAdaptation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedDL Domain Adaptation"
        self.parent.categories = ["MedDL"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDLExtension developers"]
        self.parent.helpText = """
Make an image look like it came from another scanner, stain batch or site.
<b>stain</b>: normalise an RGB H&amp;E slide to one reference slide (Macenko, Reinhard or Vahadane); Macenko
and Vahadane can also output the hematoxylin and eosin concentration maps.
<b>fourier</b>: swap the low-frequency amplitude spectrum with that of one or more reference images
(window size <i>beta</i>, circular or square window; "auto" picks beta for the window).
<br>The work runs in a background process; the command line equivalent is <code>meddl adapt</code>.
"""
        self.parent.acknowledgementText = """
Part of MedDLExtension. Macenko et al., ISBI 2009; Reinhard et al., IEEE CG&amp;A 2001; Vahadane et al.,
IEEE TMI 2016; Fourier domain adaptation: Yang and Soatto, "FDA: Fourier Domain Adaptation for Semantic
Segmentation", CVPR 2020. Sample slide: scikit-image's immunohistochemistry image.
"""


@parameterNodeWrapper
class MedDLDomainAdaptationParameterNode:
    # the wrapper sets each selector's node types from these annotations (subclasses hidden): list RGB
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]  # noqa: UP007
    referenceVolumes: list[vtkMRMLScalarVolumeNode]
    mode: Annotated[str, Choice(choices(AdaptMode))] = AdaptMode.STAIN.value
    stainMethod: Annotated[str, Choice(choices(StainMethod))] = StainMethod.MACENKO.value
    beta: Annotated[float, WithinRange(0.0, 0.5)] = 0.0  # 0: the command's default for the window
    window: Annotated[str, Choice(choices(FourierWindow))] = FourierWindow.CIRCLE.value
    domain: Annotated[str, Choice(choices(FourierDomain))] = FourierDomain.INTENSITY.value
    device: Annotated[str, Choice(DEVICES)] = "auto"
    outputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]  # noqa: UP007
    hematoxylinVolume: vtkMRMLScalarVolumeNode
    eosinVolume: vtkMRMLScalarVolumeNode
    dabVolume: vtkMRMLScalarVolumeNode
    inputLabels: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    referenceLabels: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007


class MedDLDomainAdaptationWidget(MedDLModuleWidget):
    applyToolTip = "Adapt the input volume to the reference volume(s)"

    def createLogic(self):
        return MedDLDomainAdaptationLogic()

    def setupConnections(self):
        self._updatingReferences = False
        self.ui.referenceVolumesSelector.connect("checkedNodesChanged()", self._onReferencesChanged)
        self.ui.modeComboBox.connect("currentIndexChanged(int)", self._updateModeWidgets)

    def updateGUIFromParameterNode(self):
        # the checkable combo box is not bound by the parameter node wrapper: mirror it by hand
        self._updatingReferences = True
        try:
            wanted = {node.GetID() for node in self._parameterNode.referenceVolumes if node}
            combo = self.ui.referenceVolumesSelector
            for i in range(combo.nodeCount()):
                node = combo.nodeFromIndex(i)
                combo.setCheckState(node, qt.Qt.Checked if node.GetID() in wanted else qt.Qt.Unchecked)
        finally:
            self._updatingReferences = False
        self._updateModeWidgets()

    def _onReferencesChanged(self):
        if self._updatingReferences or self._parameterNode is None:
            return
        self._parameterNode.referenceVolumes = list(self.ui.referenceVolumesSelector.checkedNodes())

    def _updateModeWidgets(self, *args):
        mode = self.ui.modeComboBox.currentText
        stain = mode == AdaptMode.STAIN.value
        self.ui.stainOptionsGroupBox.visible = stain
        self.ui.fourierOptionsGroupBox.visible = mode == AdaptMode.FOURIER.value
        self.ui.classwiseOptionsGroupBox.visible = mode == AdaptMode.CLASSWISE.value
        for widget in (self.ui.hematoxylinVolumeSelector, self.ui.eosinVolumeSelector, self.ui.dabVolumeSelector):
            widget.enabled = stain

    def cannotApplyReason(self):
        p = self._parameterNode
        references = [r for r in p.referenceVolumes if r]
        if not p.inputVolume:
            return "Select the input volume"
        if not references:
            return "Check at least one reference volume"
        if p.mode == AdaptMode.STAIN.value and len(references) != 1:
            return "Stain normalisation takes exactly one reference volume"
        if p.mode in (AdaptMode.HISTOGRAM.value, AdaptMode.CLASSWISE.value) and len(references) != 1:
            return f"The {p.mode} baseline takes exactly one reference volume"
        if p.mode == AdaptMode.CLASSWISE.value and not (p.inputLabels and p.referenceLabels):
            return "Select the labels of the input and of the reference"
        if p.outputVolume and (p.outputVolume == p.inputVolume or p.outputVolume in references):
            return "The output volume is also an input; choose or create another one"
        return ""

    def startJob(self, progress, log):
        p = self._parameterNode
        stain = p.mode == AdaptMode.STAIN.value
        return self.logic.start(
            p.inputVolume, [r for r in p.referenceVolumes if r],
            mode=p.mode, method=p.stainMethod, beta=p.beta or None, window=p.window, domain=p.domain,
            device=p.device,
            output=p.outputVolume if p.outputVolume else True,
            hematoxylin=p.hematoxylinVolume if (stain and p.hematoxylinVolume) else False,
            eosin=p.eosinVolume if (stain and p.eosinVolume) else False,
            dab=p.dabVolume if (stain and p.dabVolume) else False,
            separation="hed" if (stain and p.dabVolume) else None,  # DAB needs the fixed H, E, DAB vectors
            labels=p.inputLabels if p.mode == AdaptMode.CLASSWISE.value else None,
            reference_labels=p.referenceLabels if p.mode == AdaptMode.CLASSWISE.value else None,
            progress=progress, log=log)

    def onJobFinished(self, outputs):
        self._parameterNode.outputVolume = outputs.output
        for name in ("hematoxylin", "eosin", "dab"):
            if getattr(outputs, name) is not None:
                setattr(self._parameterNode, f"{name}Volume", getattr(outputs, name))
        self.showVolume(outputs.output)


class MedDLDomainAdaptationLogic(ScriptedLoadableModuleLogic, AdaptationLogic):
    """Usable without the widget::

        logic = slicer.util.getModuleLogic("MedDLDomainAdaptation")
        result = logic.run(slideNode, [referenceNode], mode="stain", method="macenko")

    See ``meddl.slicer_logic.AdaptationLogic`` for every option.
    """

    def __init__(self, runner=None):
        ScriptedLoadableModuleLogic.__init__(self)
        AdaptationLogic.__init__(self, slicer.mrmlScene, runner)

    def getParameterNode(self):
        return MedDLDomainAdaptationParameterNode(super().getParameterNode())


class MedDLDomainAdaptationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FourierAdaptationKeepsGeometry()

    def test_FourierAdaptationKeepsGeometry(self):
        """Fourier adaptation of a noise image to a smooth one gives a volume on the input grid."""
        import numpy as np
        from meddl import mrml
        from meddl.volume import Volume, affine_from_geometry

        self.delayDisplay("Starting the test")
        rng = np.random.default_rng(0)
        affine = affine_from_geometry([0.5, 0.5, 1.0], [10.0, 20.0, 0.0])
        source = mrml.volume_to_node(Volume(rng.random((1, 32, 32, 1)).astype(np.float32), affine),
                                     slicer.mrmlScene, name="source")
        ramp = np.linspace(0, 1, 32, dtype=np.float32)[None, :, None, None] * np.ones((1, 32, 32, 1), np.float32)
        reference = mrml.volume_to_node(Volume(ramp, affine), slicer.mrmlScene, name="reference")
        try:
            result = MedDLDomainAdaptationLogic().run(source, [reference], mode="fourier", beta=0.05, device="cpu",
                                                      timeout=600)
        except MedDLError as exc:
            if "not available" in str(exc):
                self.delayDisplay(f"Domain adaptation is not part of this build: {exc}")
                return
            raise
        self.assertEqual(result.output.GetImageData().GetDimensions(), source.GetImageData().GetDimensions())
        change = mrml.node_to_volume(result.output).numpy() - mrml.node_to_volume(source).numpy()
        self.assertGreater(float(change.std()), 1e-3)  # more than the mean moved: the window held frequencies
        self.delayDisplay("Test passed")
