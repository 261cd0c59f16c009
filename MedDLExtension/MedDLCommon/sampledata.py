"""The offline samples of :mod:`meddl.data` as a "MedDL" category of Slicer's Sample Data module.

The samples are built locally from files that PyPI wheels ship (nilearn, scikit-image, dipy) and
cached; nothing is downloaded. Sample Data sources expect URIs, so each source points at the
cached file (``file://``) and has a custom loader that builds the file first and then loads it.

The Sample Data module's buttons call that loader. ``SampleData.downloadSample("MedDL <name>")``
from a script does not (Slicer's ``downloadFromSource`` reads the URI directly), so it works only
once the sample has been built; from the Python console use :func:`loadSample` (``name`` as in
``meddl.data.available_samples()``), which always works.
"""

import logging
import os

CATEGORY = "MedDL"


def _icon():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (os.path.join(here, "Resources", "Icons"), os.path.join(here, "MedDLRegistration", "Resources", "Icons")):
        path = os.path.join(folder, "MedDLRegistration.png")
        if os.path.exists(path):
            return path
    return None


def registerSampleData():
    """Add every sample that can be built on this machine to the Sample Data module."""
    import SampleData

    try:
        from meddl import data
    except ImportError as exc:  # the library could not be imported: say so, do not break startup
        logging.warning(f"MedDL sample data not registered: {exc}")
        return
    for name in data.available_samples():
        sample = data.SAMPLES[name]
        cached = data.cache_dir() / f"{name}{sample.suffix}"
        source = dict(
            category=CATEGORY,
            sampleName=f"MedDL {name}",
            uris=cached.as_uri(),
            fileNames=f"MedDL-{name}{sample.suffix}",
            nodeNames=name,
            thumbnailFileName=_icon(),
            customDownloader=lambda source, n=name: loadSample(n),
        )
        try:
            SampleData.SampleDataLogic.registerCustomSampleDataSource(**source, loadFileTypes="VolumeFile")
        except TypeError:  # a Slicer whose Sample Data module still calls it loadFileType
            SampleData.SampleDataLogic.registerCustomSampleDataSource(**source, loadFileType="VolumeFile")


def loadSample(name):
    """Build (first time) and load one sample into the scene; returns the volume node or None."""
    import slicer
    from meddl import data

    from .dependencies import SAMPLE_REQUIREMENTS, ensureDependencies, runShowingError

    sample = data.SAMPLES[name]
    extra = SAMPLE_REQUIREMENTS.get(sample.source, {})
    if not ensureDependencies(extra, what=f"Sample '{name}'"):
        return None
    def build_and_load():
        properties = {"name": name, "labelmap": sample.kind.value == "label"}
        return slicer.util.loadVolume(str(data.sample_path(name)), properties)

    return runShowingError(f"Cannot build the sample '{name}'.", build_and_load)[1]
