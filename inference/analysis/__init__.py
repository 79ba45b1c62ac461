"""From pixels to results: tiling, the sliding-window ensemble, uncertainty, regions and polygons, SUA, nuclei, points,
PD-L1 IHC scoring, IHC-to-H&E registration and comparison, the domain guard."""
