"""The expert atlas: a static, offline website of concepts and their expert neurons
(:func:`~.site.build_atlas`; ``steer-experts atlas``)."""

from .site import AtlasReport, build_atlas

__all__ = ["AtlasReport", "build_atlas"]
