"""The Slicer extension skeleton, checked without the Slicer application.

CMake lists name every file of the modules (and every file they name exists), the shared library is
installed beside the modules (checked by configuring the project with a stand-in Slicer package),
the widgets the module code uses exist in its ``.ui``, the parameter nodes match the ``.ui``
bindings, and the Extensions Index entry validates against the index's schema.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "MedDLExtension"
MODULES = ["MedDLRegistration", "MedDLReconstruction", "MedDLDomainAdaptation", "MedDLInContextSegmentation"]
SHARED = Path(os.environ.get("MEDDL_SHARED_DIR", "/work/shared/slicer"))
LIBRARY_CARRIER = "MedDLRegistration"


# -- CMake parsing -------------------------------------------------------------------------------


def _strip_comment(line: str) -> str:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def _cmake_text(path: Path) -> str:
    return "\n".join(_strip_comment(line) for line in path.read_text().splitlines())


def _cmake_set(text: str, name: str) -> list[str]:
    match = re.search(rf"\bset\(\s*{re.escape(name)}\b(.*?)\)", text, re.S)
    assert match, f"set({name} ...) missing"
    return match.group(1).split()


def _module_lists(module: str) -> tuple[str, list[str], list[str], str]:
    text = _cmake_text(EXT / module / "CMakeLists.txt")
    name = _cmake_set(text, "MODULE_NAME")[0]
    sub = lambda items: [i.replace("${MODULE_NAME}", name) for i in items]  # noqa: E731
    return name, sub(_cmake_set(text, "MODULE_PYTHON_SCRIPTS")), sub(_cmake_set(text, "MODULE_PYTHON_RESOURCES")), text


def test_top_level_cmakelists_has_what_the_extension_needs():
    text = _cmake_text(ROOT / "CMakeLists.txt")
    for needed in [
        r"cmake_minimum_required\(VERSION \d", r"project\(MedDLExtension\)", r"find_package\(Slicer REQUIRED\)",
        r"include\(\$\{Slicer_USE_FILE\}\)", r"include\(\$\{Slicer_EXTENSION_GENERATE_CONFIG\}\)",
        r"include\(\$\{Slicer_EXTENSION_CPACK\}\)", r"set\(EXTENSION_DEPENDS PyTorch\)",
    ]:
        assert re.search(needed, text), needed
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        value = re.search(rf'set\(EXTENSION_{var} "([^"]+)"\)', text)
        assert value and value.group(1).strip(), f"EXTENSION_{var} is empty"
        if var in ("HOMEPAGE", "ICONURL", "SCREENSHOTURLS"):
            assert value.group(1).startswith("https://")
    assert re.findall(r"add_subdirectory\((\S+)\)", text) == [f"MedDLExtension/{m}" for m in MODULES]
    assert text.index("find_package(Slicer") < text.index("add_subdirectory") < text.index("EXTENSION_GENERATE_CONFIG")


@pytest.mark.parametrize("module", MODULES)
def test_module_cmakelists_names_every_file_and_every_named_file_exists(module):
    name, scripts, resources, text = _module_lists(module)
    folder = EXT / module
    assert name == module
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s+SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r".*?RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s+WITH_GENERIC_TESTS\s*\)", text, re.S)
    for item in scripts + resources:
        assert (folder / item).is_file(), f"{module}/CMakeLists.txt names a missing file {item}"
    assert f"{module}.py" in scripts
    assert {f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png"} <= set(resources)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.suffix in (".py", ".ui", ".png") and "__pycache__" not in p.parts and "Testing" not in p.parts}
    assert on_disk == set(scripts) | set(resources), "files on disk and in CMakeLists.txt differ"


def test_library_files_are_globbed_for_install_by_one_module():
    text = _cmake_text(EXT / LIBRARY_CARRIER / "CMakeLists.txt")
    glob = re.search(r"file\(GLOB_RECURSE MEDDL_PACKAGE_SCRIPTS(.*?)\)", text, re.S).group(1)
    assert "${MEDDL_PACKAGES_SOURCE_DIR}/meddl/*.py" in glob and "${MEDDL_PACKAGES_SOURCE_DIR}/MedDLCommon/*.py" in glob
    assert re.search(r"SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\} \$\{MEDDL_STAGED_SCRIPTS\}", text)
    assert "${PROJECT_SOURCE_DIR}/Resources/models/*" in text
    for other in MODULES:
        if other != LIBRARY_CARRIER:
            assert "meddl/" not in _cmake_text(EXT / other / "CMakeLists.txt")


# A stand-in for Slicer's CMake package: the same checks as slicerMacroBuildScriptedModule and the same
# target paths as CTK's ctkMacroCompilePythonScript (relative scripts keep their path; absolute ones are
# made relative to the current build folder), copying at configure time so the result can be inspected.
STUB_CONFIG = """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
"""
STUB_USE = """
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(BUILD_TESTING OFF)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "unknown arguments: ${MY_UNPARSED_ARGUMENTS}")
  endif()
  set(dest ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
  foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
    if(IS_ABSOLUTE ${f})
      set(src ${f})
    else()
      set(src ${CMAKE_CURRENT_SOURCE_DIR}/${f})
    endif()
    if(NOT EXISTS ${src})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${f}'")
    endif()
  endforeach()
  foreach(f ${MY_SCRIPTS})
    if(IS_ABSOLUTE ${f})
      file(RELATIVE_PATH tgt ${CMAKE_CURRENT_BINARY_DIR} ${f})
      configure_file(${f} ${dest}/${tgt} COPYONLY)
    else()
      configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${f} ${dest}/${f} COPYONLY)
    endif()
  endforeach()
  foreach(f ${MY_RESOURCES})
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${f} ${dest}/${f} COPYONLY)
  endforeach()
  file(APPEND ${CMAKE_BINARY_DIR}/modules.txt "${MY_NAME} generic_tests=${MY_WITH_GENERIC_TESTS}\\n")
endmacro()
macro(slicer_add_python_unittest)
endmacro()
"""


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    work = tmp_path_factory.mktemp("cmake")
    stub = work / "SlicerStub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_CONFIG)
    (stub / "UseSlicer.cmake").write_text(STUB_USE)
    (stub / "Empty.cmake").write_text("")
    build = work / "build"
    out = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={stub}", "-G", "Unix Makefiles"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return build / "lib/Slicer-5.10/qt-scripted-modules"


def test_configure_installs_modules_library_and_helpers_beside_each_other(configured):
    modules = (configured.parent.parent.parent / "modules.txt").read_text().split("\n")
    assert [m.split()[0] for m in modules if m] == MODULES
    assert all("generic_tests=TRUE" in m for m in modules if m)
    for module in MODULES:
        assert (configured / f"{module}.py").is_file()
        assert (configured / "Resources/UI" / f"{module}.ui").is_file()
        assert (configured / "Resources/Icons" / f"{module}.png").is_file()
    for package in ("meddl", "MedDLCommon"):
        wanted = {p.relative_to(EXT).as_posix() for p in (EXT / package).rglob("*.py") if "__pycache__" not in p.parts}
        staged = {p.relative_to(configured).as_posix() for p in (configured / package).rglob("*.py")}
        assert wanted and wanted == staged, f"{package}: not staged: {sorted(wanted - staged)}"
    models = [p.name for p in (ROOT / "Resources/models").glob("*") if p.is_file()] if (ROOT / "Resources/models").is_dir() else []
    for name in models:
        assert (configured / "Resources/models" / name).is_file()
    assert (configured / "Resources/Scripts/batch.py").is_file()  # the README's Slicer cohort script


def test_installed_library_imports_from_the_scripted_modules_folder(configured, tmp_path):
    code = ("import meddl, meddl.slicer_logic, meddl.runner, meddl.models as m; "
            "print(meddl.__file__); print(m.models_dir()); print(meddl.runner.library_root())")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(configured)!r}); {code}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    module_file, models, root = out.stdout.split()
    assert Path(module_file).parent == configured / "meddl"
    assert Path(root) == configured  # the background process gets this folder on its PYTHONPATH
    if (ROOT / "Resources/models").is_dir() and any((ROOT / "Resources/models").iterdir()):
        assert Path(models) == configured / "Resources/models"


# -- Extensions Index entry ----------------------------------------------------------------------


def test_extensions_index_entry_validates_and_matches_cmake():
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = SHARED / "slicer-extension-catalog-entry-schema-v1.0.2.json"
    if not schema_path.is_file():
        pytest.skip(f"schema not found at {schema_path}")
    entry_path = ROOT / "MedDLExtension.json"
    entry = json.loads(entry_path.read_text())
    jsonschema.validate(entry, json.loads(schema_path.read_text()))
    accepted = {line.strip() for line in (SHARED / "accepted-categories.txt").read_text().splitlines() if line.strip()}
    assert entry["category"] in accepted
    assert not entry_path.stem.lower().startswith("slicer")
    assert entry["scm_url"].startswith("https://")
    cmake_category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert cmake_category == entry["category"]
    assert "PyTorch" in entry.get("build_dependencies", [])


# -- module files ---------------------------------------------------------------------------------


def _ui(module: str) -> ET.Element:
    return ET.parse(EXT / module / "Resources/UI" / f"{module}.ui").getroot()


def _ui_widgets(module: str) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in _ui(module).iter("widget")}


def _bound(widget: ET.Element) -> str | None:
    for p in widget.findall("property"):
        if p.get("name") == "SlicerParameterName":
            return p.findtext("string")
    return None


def _parameter_fields(module: str) -> dict[str, ast.expr]:
    tree = ast.parse((EXT / module / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper" for d in node.decorator_list):
            return {n.target.id: n.annotation for n in node.body if isinstance(n, ast.AnnAssign)}
    raise AssertionError(f"{module}: no @parameterNodeWrapper class")


def _choices_namespace(module: str) -> dict:
    import meddl.slicer_logic as logic

    namespace = {name: getattr(logic, name) for name in logic.__all__}
    widget = ast.parse((EXT / "MedDLCommon/widget.py").read_text())
    source = ast.parse((EXT / module / f"{module}.py").read_text())
    for tree in (widget, source):
        for node in tree.body:
            if isinstance(node, ast.Assign):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                targets = node.targets[0]
                names = [t.id for t in targets.elts] if isinstance(targets, ast.Tuple) else [targets.id]
                values = value if isinstance(targets, ast.Tuple) else [value]
                namespace.update(zip(names, values, strict=True))
    return namespace


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_code_uses_exists_in_the_ui(module):
    names = set(_ui_widgets(module))
    code = (EXT / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    base = set(re.findall(r"self\.ui\.(\w+)", (EXT / "MedDLCommon/widget.py").read_text()))
    assert not (used | base) - names, f"{module}.ui lacks {sorted((used | base) - names)}"
    root = _ui(module)
    assert root.findtext("class") == module and root.find("widget").get("class") == "qMRMLWidget"


@pytest.mark.parametrize("module", MODULES)
def test_ui_bindings_match_the_parameter_node(module):
    fields = _parameter_fields(module)
    namespace = _choices_namespace(module)
    code = (EXT / module / f"{module}.py").read_text()
    bound = {}
    for name, widget in _ui_widgets(module).items():
        parameter = _bound(widget)
        if parameter:
            assert parameter in fields, f"{module}.ui: {name} is bound to unknown parameter '{parameter}'"
            bound[parameter] = widget
    for field, annotation in fields.items():
        if field not in bound:  # mirrored by hand in the module code
            assert re.search(rf"\.{field} =", code), f"{module}: parameter '{field}' is neither bound nor set"
            continue
        widget = bound[field]
        text = ast.unparse(annotation)
        choice = re.search(r"Choice\((.*)\)\]$", text)
        if widget.get("class") == "QComboBox" and choice:
            items = [i.findtext("property/string") for i in widget.findall("item")]
            assert items == list(eval(choice.group(1), namespace)), f"{module}: {field} combo items differ"  # noqa: S307
        if widget.get("class") == "qMRMLNodeComboBox":
            slicer = pytest.importorskip("slicer")
            wanted = tuple(getattr(slicer, name) for name in re.findall(r"vtkMRML\w+", text))  # a class or a Union
            assert wanted, f"{module}: {field} is bound to a node selector but annotated {text}"
            # the wrapper replaces the selector's node types by the annotation's classes: with child types
            # hidden, a type the .ui lists but the annotation only covers as a subclass would disappear
            children = widget.find("property[@name='showChildNodeTypes']/bool")
            exact = children is not None and children.text == "false"
            for t in [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]:
                if exact:
                    assert getattr(slicer, t) in wanted, f"{module}: {field} lists {t}, hidden by the annotation {text}"
                else:
                    assert issubclass(getattr(slicer, t), wanted), f"{module}: {field} lists {t}, not a {text}"
        if text.startswith("Union["):  # the wrapper writes None (its default, the "(none)" choice) into it
            assert text.endswith(", None]"), f"{module}: {field}: a Union needs None, got {text}"
        if widget.get("class") == "ctkSliderWidget" and (text == "float" or text.startswith("Annotated[float")):
            assert "WithinRange(" in text, f"{module}: {field} is on a slider, which needs a WithinRange, got {text}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_connects_the_scene_to_every_mrml_widget(module):
    root = _ui(module)
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml and mrml == connected


@pytest.mark.parametrize("module", MODULES)
def test_module_file_compiles_and_is_a_thin_scripted_module(module, tmp_path):
    path = EXT / module / f"{module}.py"
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    source = path.read_text()
    assert len(source.splitlines()) < 300
    assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.M), "no tensor code in module files"
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "MedDLModuleWidget"),
                         ("Logic", "ScriptedLoadableModuleLogic"), ("Test", "ScriptedLoadableModuleTest")):
        cls = classes[f"{module}{suffix}"]
        assert base in [ast.unparse(b) for b in cls.bases]
    init = next(f for f in classes[module].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assigned = {ast.unparse(t): n.value for n in ast.walk(init) if isinstance(n, ast.Assign) for t in n.targets}
    assert ast.literal_eval(assigned["self.parent.categories"]) == ["MedDL"]
    assert ast.literal_eval(assigned["self.parent.title"]).startswith("MedDL ")
    for field in ("contributors", "helpText", "acknowledgementText"):
        assert ast.literal_eval(assigned[f"self.parent.{field}"])
    widget_methods = {f.name for f in classes[f"{module}Widget"].body if isinstance(f, ast.FunctionDef)}
    assert {"createLogic", "cannotApplyReason", "startJob", "onJobFinished"} <= widget_methods
    assert "runTest" in {f.name for f in classes[f"{module}Test"].body if isinstance(f, ast.FunctionDef)}


def test_shared_helpers_compile_and_widget_base_has_check_can_apply(tmp_path):
    for path in (EXT / "MedDLCommon").glob("*.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    source = (EXT / "MedDLCommon/widget.py").read_text()
    assert "def _checkCanApply(" in source and "qt.QTimer()" in source and "connectGui(self.ui)" in source


@pytest.mark.parametrize("module", MODULES)
def test_icon_is_a_128_pixel_png(module):
    image = pytest.importorskip("PIL.Image")
    with image.open(EXT / module / "Resources/Icons" / f"{module}.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


# -- MedDLCommon parts that run without Slicer ----------------------------------------------------


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"MedDLCommon_{name}", EXT / "MedDLCommon" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dependencies_pin_slicers_numpy_and_simpleitk_and_find_missing_packages():
    deps = _load("dependencies")
    assert deps.missingPackages({"numpy": "numpy>=1", "no_such_module_meddl": "no-such-dist>=1"}) == ["no-such-dist>=1"]
    lines = deps.constraintsText().split()
    assert f"numpy=={importlib.metadata.version('numpy')}" in lines
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in lines
    assert "torch" not in deps.REQUIREMENTS  # torch only through the PyTorch extension
    assert deps.torchVersion() >= deps.MINIMUM_TORCH


def test_sample_data_sources_point_at_the_local_cache(monkeypatch):
    calls = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    _load("sampledata").registerSampleData()
    from meddl import data

    assert [c["nodeNames"] for c in calls] == data.available_samples()
    for call in calls:
        assert call["category"] == "MedDL" and callable(call["customDownloader"])
        assert call["uris"].startswith("file://") and call["uris"].endswith(call["fileNames"].removeprefix("MedDL-"))
        assert Path(call["thumbnailFileName"]).is_file()


def test_sample_data_registers_with_an_older_sample_data_module(monkeypatch):
    calls = []

    def older(category="Custom", sampleName=None, uris=None, fileNames=None, nodeNames=None, customDownloader=None,
              thumbnailFileName=None, loadFileType="VolumeFile", loadFiles=None, loadFileProperties=None):
        calls.append(loadFileType)

    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=older)
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    _load("sampledata").registerSampleData()
    from meddl import data

    assert calls == ["VolumeFile"] * len(data.available_samples())


@pytest.fixture
def common_package(monkeypatch):
    """MedDLCommon's helper modules imported as a package (its ``__init__`` needs Qt), with the real
    ``slicer.util.tryWithErrorDisplay`` and a stand-in ``slicer.app`` (in testing mode: no dialogs)."""
    import slicer
    import slicer.util

    package = types.ModuleType("MedDLCommon")
    package.__path__ = [str(EXT / "MedDLCommon")]
    monkeypatch.setitem(sys.modules, "MedDLCommon", package)
    for name in ("dependencies", "sampledata"):  # fresh imports, dropped again after the test
        monkeypatch.setitem(sys.modules, f"MedDLCommon.{name}", None)
        monkeypatch.delitem(sys.modules, f"MedDLCommon.{name}")
    app = types.SimpleNamespace(testingEnabled=lambda: True, setOverrideCursor=lambda cursor: None,
                                restoreOverrideCursor=lambda: None)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setitem(sys.modules, "qt", types.SimpleNamespace(Qt=types.SimpleNamespace(WaitCursor=3)))
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda *a, **k: shown.append(a), raising=False)
    import importlib

    return types.SimpleNamespace(deps=importlib.import_module("MedDLCommon.dependencies"),
                                 samples=importlib.import_module("MedDLCommon.sampledata"), shown=shown)


def test_a_sample_that_cannot_be_built_returns_none_not_an_exception(common_package, monkeypatch):
    from meddl import data

    monkeypatch.setattr(common_package.deps, "ensureDependencies", lambda *a, **k: True)

    called = []

    def broken(name):
        called.append(name)
        raise OSError("disk full")

    monkeypatch.setattr(data, "sample_path", broken)
    assert common_package.samples.loadSample(data.available_samples()[0]) is None
    assert called == [data.available_samples()[0]]  # it got as far as building the sample


def test_a_failed_pip_install_returns_false_not_an_exception(common_package, monkeypatch):
    import slicer.util

    deps = common_package.deps
    monkeypatch.setattr(deps, "missingPackages", lambda wanted: ["no-such-dist>=1"])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)

    called = []

    def failing(requirements):
        called.append(requirements)
        raise RuntimeError("pip failed")

    monkeypatch.setattr(deps, "pipInstall", failing)
    assert deps.ensureDependencies(what="test") is False
    assert called == [["no-such-dist>=1"]]  # the install ran and failed; its error did not escape


def test_torch_is_installed_with_the_minimum_version_and_a_failure_does_not_escape(common_package, monkeypatch):
    deps = common_package.deps
    monkeypatch.setattr(deps, "torchVersion", lambda: None)
    calls = []

    class Logic:  # PyTorchUtilsLogic, recent (with the version requirement)
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append(torchVersionRequirement)
            raise RuntimeError("pip failed")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    assert deps.ensureTorch(askConfirmation=False) is False
    assert calls == [">=" + ".".join(map(str, deps.MINIMUM_TORCH))]

    class OldLogic:  # an older PyTorch extension: no requirement argument, returns None when declined
        def installTorch(self, askConfirmation=False):
            calls.append("old")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=OldLogic))
    assert deps.ensureTorch(askConfirmation=False) is False and calls[-1] == "old"


_LOGIC_OF = {"MedDLRegistration": ("RegistrationLogic", "RegistrationResult"),
             "MedDLReconstruction": ("ReconstructionLogic", "ReconstructionResult"),
             "MedDLDomainAdaptation": ("AdaptationLogic", "AdaptationResult"),
             "MedDLInContextSegmentation": ("InContextSegmentationLogic", "SegmentationResult")}


@pytest.mark.parametrize("module", MODULES)
def test_the_widget_calls_its_logic_with_real_arguments_and_reads_real_results(module):
    """The widget code never runs here (no Qt): check by reading it that ``self.logic.start(...)`` names
    parameters the Logic has (not left to its **options, which are the command's) and that
    ``onJobFinished`` reads fields the result has."""
    import dataclasses
    import inspect

    from meddl import slicer_logic

    logic_name, result_name = _LOGIC_OF[module]
    start = inspect.signature(getattr(slicer_logic, logic_name).start).parameters
    fields = {f.name for f in dataclasses.fields(getattr(slicer_logic, result_name))}
    tree = ast.parse((EXT / module / f"{module}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "start" and ast.unparse(n.func.value) == "self.logic"]
    assert len(calls) == 1, f"{module}: expected one self.logic.start(...) call"
    named = [k.arg for k in calls[0].keywords if k.arg]
    assert named and set(named) <= set(start), f"{module}: start() has no {set(named) - set(start)}"
    finished = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "onJobFinished")
    read = {n.attr for n in ast.walk(finished) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "outputs"}
    assert read <= fields, f"{module}: the result has no {read - fields}"


def test_the_slicer_batch_script_reads_real_result_fields():
    import dataclasses

    from meddl import slicer_logic

    fields = set().union(*({f.name for f in dataclasses.fields(getattr(slicer_logic, r))}
                           for _, r in _LOGIC_OF.values()))
    tree = ast.parse((ROOT / "Resources" / "Scripts" / "batch.py").read_text())
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "result"}
    assert read and read <= fields, f"batch.py reads result fields that do not exist: {read - fields}"
