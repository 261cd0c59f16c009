"""Few-shot in-context segmentation and processing (Neuralizer-style).

One network performs the task shown by a context set of (input, output) pairs - segmentation of
any structure, or an image-to-image task - with no retraining. ``segment`` runs it slice-wise on
a volume: propagation from a few painted slices, or context from other segmented scans.

    from meddl.incontext import SegmentConfig, segment
    labels = segment(target, SegmentConfig(), annotated=partial_labels)
"""

from .inference import MAX_CONTEXT, SegmentConfig, Selection, Task, load_network, segment

__all__ = ["segment", "SegmentConfig", "Task", "Selection", "load_network", "MAX_CONTEXT"]
