"""From pixels to results: tiling, the sliding-window ensemble, uncertainty, regions, SUA, nuclei, points."""
