"""Face detectors behind one interface: ``detect(images) -> list[list[Face]]``."""

from facepipe.detection.base import DETECTOR_NAMES, Detector, create_detector, pipeline_detector_options

__all__ = ["DETECTOR_NAMES", "Detector", "create_detector", "pipeline_detector_options"]
