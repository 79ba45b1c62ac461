"""QuPath side of pdl1-bridge: projects, QuPath GeoJSON, the CLI and the HTTP service.

Nothing here imports torch; it calls the public API of :mod:`inference`.
"""

from inference import __version__

__all__ = ["__version__"]
