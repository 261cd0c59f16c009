"""MedDL In-Context Segmentation: segment a volume from a few painted slices or a few labelled examples.

The computation runs in a background ``meddl segment`` process (see meddl.slicer_logic);
this file holds the module description, the widget and the self-test only.
"""

from typing import Annotated, Union

import slicer
from meddl.errors import MedDLError
from meddl.slicer_logic import (
    IN_CONTEXT_ALIGN,
    IN_CONTEXT_TASKS,
    SEGMENTATION_TASK,
    InContextSegmentationLogic,
    SegmentOutput,
    choices,
)
from MedDLCommon import DEVICES, MedDLModuleWidget
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

PAINTED, CONTEXT = "painted slices", "context examples"


class MedDLInContextSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedDL In-Context Segmentation"
        self.parent.categories = ["MedDL"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDLExtension developers"]
        self.parent.helpText = """
Segment a structure without training a model for it. Either paint the structure on a few slices of the
target volume (Segment Editor) and pick that segment, or give a few other volumes with their
segmentations as <b>context examples</b>. The model segments the whole target from these examples.
The result goes into a new segment (your painted segment is kept), replaces the painted segment, or
becomes a new label map volume.
<br>The work runs in a background process; the command line equivalent is <code>meddl segment</code>.
"""
        self.parent.acknowledgementText = """
Part of MedDLExtension. In-context segmentation: a network conditioned on example image/label pairs, in the
spirit of Butoi et al., "UniverSeg: Universal Medical Image Segmentation", ICCV 2023.
"""


@parameterNodeWrapper
class MedDLInContextSegmentationParameterNode:
    targetVolume: vtkMRMLScalarVolumeNode
    source: Annotated[str, Choice([PAINTED, CONTEXT])] = PAINTED
    paintedSegmentation: vtkMRMLSegmentationNode
    paintedSegmentId: str = ""
    allSegments: bool = False
    contextVolume1: vtkMRMLScalarVolumeNode
    contextOutput1: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, None]  # noqa: UP007
    contextVolume2: vtkMRMLScalarVolumeNode
    contextOutput2: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, None]  # noqa: UP007
    contextVolume3: vtkMRMLScalarVolumeNode
    contextOutput3: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, None]  # noqa: UP007
    task: Annotated[str, Choice(list(IN_CONTEXT_TASKS))] = SEGMENTATION_TASK
    outputMode: Annotated[str, Choice(choices(SegmentOutput))] = SegmentOutput.NEW_SEGMENT.value
    outputSegmentation: vtkMRMLSegmentationNode
    # the wrapper sets each selector's node types from these annotations, and needs None in a Union
    # (typing.Union is what it knows) and a range for a float on a slider
    outputVolume: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, None]  # noqa: UP007
    prior: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    align: Annotated[str, Choice(list(IN_CONTEXT_ALIGN))] = IN_CONTEXT_ALIGN[0]
    atlasPrior: Annotated[float, WithinRange(0.0, 1.0)] = 0.25
    device: Annotated[str, Choice(DEVICES)] = "auto"


class MedDLInContextSegmentationWidget(MedDLModuleWidget):
    applyToolTip = "Segment the target volume from the examples"

    def createLogic(self):
        return MedDLInContextSegmentationLogic()

    def setupConnections(self):
        # the segment selector is not bound by the parameter node wrapper: mirror it by hand
        self.ui.paintedSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._onPaintedSegmentChanged)
        self.ui.paintedSegmentSelector.connect("currentSegmentChanged(QString)", self._onPaintedSegmentChanged)
        self.ui.sourceComboBox.connect("currentIndexChanged(int)", self._updateSourceWidgets)
        self.ui.outputModeComboBox.connect("currentIndexChanged(int)", self._updateSourceWidgets)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self._updateSourceWidgets)

    def updateGUIFromParameterNode(self):
        p = self._parameterNode
        selector = self.ui.paintedSegmentSelector
        wasBlocked = selector.blockSignals(True)
        selector.setCurrentNode(p.paintedSegmentation)
        if p.paintedSegmentId:
            selector.setCurrentSegmentID(p.paintedSegmentId)
        selector.blockSignals(wasBlocked)
        self._updateSourceWidgets()

    def _onPaintedSegmentChanged(self, *args):
        if self._parameterNode is None:
            return
        self._parameterNode.paintedSegmentation = self.ui.paintedSegmentSelector.currentNode()
        self._parameterNode.paintedSegmentId = self.ui.paintedSegmentSelector.currentSegmentID() or ""

    def _updateSourceWidgets(self, *args):
        painted = self.ui.sourceComboBox.currentText == PAINTED
        self.ui.paintedGroupBox.visible = painted
        self.ui.contextGroupBox.visible = not painted
        imageTask = self.ui.taskComboBox.currentText != SEGMENTATION_TASK
        mode = self.ui.outputModeComboBox.currentText
        self.ui.outputModeComboBox.enabled = not imageTask  # an image task always gives a volume
        self.ui.outputSegmentationSelector.enabled = not imageTask and mode == SegmentOutput.NEW_SEGMENT.value
        self.ui.outputVolumeSelector.enabled = imageTask or mode == SegmentOutput.NEW_VOLUME.value

    def _contextPairs(self):
        p = self._parameterNode
        pairs = [(p.contextVolume1, p.contextOutput1), (p.contextVolume2, p.contextOutput2),
                 (p.contextVolume3, p.contextOutput3)]
        return [(v, s) for v, s in pairs if v or s]

    def cannotApplyReason(self):
        p = self._parameterNode
        if not p.targetVolume:
            return "Select the target volume"
        if p.source == PAINTED:
            if p.task != SEGMENTATION_TASK:
                return f"The '{p.task}' task learns from context examples, not painted slices"
            if not p.paintedSegmentation or not (p.paintedSegmentId or p.allSegments):
                return "Select the segmentation and the segment painted on the target"
        else:
            pairs = self._contextPairs()
            if not pairs:
                return "Select at least one example volume with its segmentation"
            if any(not v or not s for v, s in pairs):
                return "Each example volume needs its segmentation or output (and each of those its volume)"
            if p.task == SEGMENTATION_TASK and p.outputMode == SegmentOutput.REPLACE_SEGMENT.value:
                return "'replace segment' needs a painted segment; choose another output"
        return ""

    def _paintedSegmentIds(self):
        segmentation = self._parameterNode.paintedSegmentation.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    def startJob(self, progress, log):
        p = self._parameterNode
        painted = p.source == PAINTED
        return self.logic.start(
            p.targetVolume,
            segmentation=p.paintedSegmentation if painted else None,
            segment_id=(self._paintedSegmentIds() if p.allSegments else p.paintedSegmentId) if painted else None,
            context=() if painted else self._contextPairs(),
            task=p.task, output_mode=p.outputMode, device=p.device, prior=p.prior if painted else None,
            align=None if painted else p.align, atlas_prior=None if painted else p.atlasPrior,
            output_segmentation=p.outputSegmentation, output_volume=p.outputVolume,
            progress=progress, log=log)

    def onJobFinished(self, outputs):
        p = self._parameterNode
        if outputs.volume is not None and outputs.volume.IsA("vtkMRMLLabelMapVolumeNode"):
            p.outputVolume = outputs.volume
            self.showVolume(p.targetVolume, outputs.volume)
        elif outputs.volume is not None:
            p.outputVolume = outputs.volume
            self.showVolume(outputs.volume)
        else:
            self.showVolume(p.targetVolume)


class MedDLInContextSegmentationLogic(ScriptedLoadableModuleLogic, InContextSegmentationLogic):
    """Usable without the widget::

        logic = slicer.util.getModuleLogic("MedDLInContextSegmentation")
        result = logic.run(ctNode, segmentation=paintedNode, segment_id="Segment_1")

    See ``meddl.slicer_logic.InContextSegmentationLogic`` for every option.
    """

    def __init__(self, runner=None):
        ScriptedLoadableModuleLogic.__init__(self)
        InContextSegmentationLogic.__init__(self, slicer.mrmlScene, runner)

    def getParameterNode(self):
        return MedDLInContextSegmentationParameterNode(super().getParameterNode())


class MedDLInContextSegmentationTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentFromPaintedSlices()

    def test_SegmentFromPaintedSlices(self):
        """A bright box painted on two slices; the result is a new segment beside the painted one."""
        import numpy as np
        from meddl import mrml
        from meddl.volume import Kind, Volume, affine_from_geometry

        self.delayDisplay("Starting the test")
        affine = affine_from_geometry([1.0, 1.0, 2.0], [0.0, 0.0, 0.0])
        image = np.zeros((1, 32, 32, 8), np.float32)
        image[0, 8:24, 8:24, :] = 100.0
        target = mrml.volume_to_node(Volume(image, affine), slicer.mrmlScene, name="target")
        painted = np.zeros((1, 32, 32, 8), np.uint8)
        painted[0, 8:24, 8:24, 2] = 1
        painted[0, 8:24, 8:24, 5] = 1
        segmentation = mrml.labels_to_segmentation_node(
            Volume(painted, affine, Kind.LABEL), slicer.mrmlScene, [mrml.SegmentInfo(1, "box", (1.0, 0.5, 0.0))])
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        try:
            result = MedDLInContextSegmentationLogic().run(target, segmentation=segmentation, segment_id=segmentId,
                                                           device="cpu", timeout=600)
        except MedDLError as exc:
            if "not available" in str(exc):
                self.delayDisplay(f"In-context segmentation is not part of this build: {exc}")
                return
            raise
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertEqual(len(result.segment_ids), 1)
        self.delayDisplay("Test passed")
