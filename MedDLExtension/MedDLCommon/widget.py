"""The widget behaviour the four MedDL modules share.

A module widget subclasses :class:`MedDLModuleWidget` and fills in a few hooks
(``createLogic``, ``cannotApplyReason``, ``startJob``, ``onJobFinished``, optionally
``setupConnections`` / ``updateGUIFromParameterNode`` for widgets the parameter node wrapper
cannot bind). The base loads ``Resources/UI/<Module>.ui``, binds its widgets to the typed
parameter node (the ``SlicerParameterName`` property of each widget), and runs the Logic's job
without blocking Slicer: a ``qt.QTimer`` calls ``job.poll()``, which feeds the progress bar and
status label; Cancel kills the background process tree.

Every module's ``.ui`` has: ``applyButton``, ``cancelButton``, ``progressBar``, ``statusLabel``,
``deviceComboBox`` and ``inputsCollapsibleButton``.
"""

import logging

import qt
import slicer
import vtk
from meddl.errors import Cancelled, MedDLError
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from .dependencies import ensureDependencies, runShowingError

#: the choices of every device combo box (the ``--device`` of the meddl command)
DEVICES = ["auto", "cpu", "cuda", "mps"]


class MedDLModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Base of the MedDL module widgets; see the module docstring for the hooks."""

    #: extra pip requirements of this module (import name -> requirement)
    extraRequirements = {}
    #: what the Apply button does, shown as its tooltip when it is enabled
    applyToolTip = "Run"
    pollIntervalMs = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None

    # -- hooks --------------------------------------------------------------------------------
    def createLogic(self):
        raise NotImplementedError

    def setupConnections(self):
        """Connect widgets the parameter node wrapper does not bind."""

    def updateGUIFromParameterNode(self):
        """Refresh widgets the parameter node wrapper does not bind."""

    def cannotApplyReason(self):
        """Why Apply is disabled ("" when it can run)."""
        return ""

    def startJob(self, progress, log):
        """Start the Logic and return its :class:`meddl.slicer_logic.Job`."""
        raise NotImplementedError

    def onJobFinished(self, outputs):
        """Show the outputs (store them in the parameter node, set slice views)."""

    # -- setup and lifecycle ------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = self.createLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.pollIntervalMs)
        self._timer.connect("timeout()", self._onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.progressBar.setRange(0, 1000)
        self.setupConnections()
        self._setRunning(False)
        self.initializeParameterNode()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
            try:  # let it end, so its temporary folder is removed (the poll timer stops below)
                self._job.wait(timeout=10)
            except Exception:  # noqa: BLE001 - cancelled, or failed: either way it is over
                pass
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.updateGUIFromParameterNode()
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        if self._parameterNode is None:
            reason = "No parameter node"
        else:
            reason = self.cannotApplyReason()
        self.ui.applyButton.enabled = self._job is None and not reason
        self.ui.applyButton.toolTip = reason or self.applyToolTip

    # -- running ------------------------------------------------------------------------------
    @property
    def device(self):
        return self.ui.deviceComboBox.currentText or "auto"

    def onApplyButton(self):
        if self._job is not None:
            return
        if not ensureDependencies(self.extraRequirements, what=self.moduleName):
            self._setStatus("Not run: the required Python packages are not installed.")
            return
        started, job = runShowingError(f"{self.moduleName}: cannot start.",
                                       lambda: self.startJob(progress=self._onProgress, log=self._onLog))
        if not started:  # the error was shown; it must not escape from the Qt slot
            self._setStatus("Not run: see the error message.")
            return
        if job is None:
            return
        self._job = job
        self._setRunning(True)
        self._onProgress(0.0, "starting the background process")
        self._timer.start()

    def onCancelButton(self):
        if self._job is not None:
            self._setStatus("Cancelling...")
            self._job.cancel()

    def _onPoll(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        if not job.poll():
            return
        self._timer.stop()
        self._job = None
        self._setRunning(False)
        try:
            outputs = job.result()
        except Cancelled:
            self._setStatus("Cancelled.")
        except Exception as exc:
            if not isinstance(exc, MedDLError):  # a bug, not a user error: keep the traceback in the log
                logging.error(f"{self.moduleName}: importing the results failed", exc_info=exc)
            self._setStatus(f"Failed: {exc}")
            details = job.process.stderr if job.process is not None else ""
            slicer.util.errorDisplay(f"{self.moduleName} failed:\n\n{exc}", detailedText=details)
        else:
            seconds = job.process.elapsed if job.process is not None else 0.0
            self._setStatus(f"Done in {seconds:.1f} s.")
            self.onJobFinished(outputs)
        self._checkCanApply()

    def _onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(1000 * fraction))
        if message:
            self._setStatus(message)

    def _onLog(self, line):
        logging.info(f"{self.moduleName}: {line}")

    def _setStatus(self, text):
        self.ui.statusLabel.text = text

    def _setRunning(self, running):
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        self.ui.inputsCollapsibleButton.enabled = not running
        if running:
            self.ui.applyButton.enabled = False
        else:
            self._checkCanApply()

    @staticmethod
    def showVolume(node, labelNode=None):
        """Show a result volume in the slice views (as background, with a label map on top)."""
        if node is not None and node.IsA("vtkMRMLVolumeNode"):
            # label=None would clear a label map the user shows; keep it unless there is a new one
            slicer.util.setSliceViewerLayers(background=node, fit=True,
                                             label=labelNode if labelNode is not None else "keep-current")
