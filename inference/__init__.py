"""Pixels in, ``SlideResult`` out: slide reading, tiling, models and uncertainty.

Nothing here knows about QuPath, paquo, HTTP or GeoJSON (see DESIGN.md §1).
"""

__version__ = "0.1.0"
