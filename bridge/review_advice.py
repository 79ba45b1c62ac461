"""What a pathologist can do about each review reason: one line per kind of reason, said once under a run's table.

A reason alone ("nuclei uncertainty (0.994, limit 0.698)") says what tripped, not where to look in QuPath or how to
fix it for the next slides. The reasons are the analysis's own words (:data:`inference.pipeline.REVIEW_REASONS`,
the nuclei, stain, tissue and domain checks, and a case's comparison of its H&E and IHC); each kind is known here by
words its text always holds, and a test keeps every reason the analysis can give covered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Advice:
    """What to do about one kind of review reason: ``words`` its text always holds, ``kind`` its short name;
    ``{stain_fix}`` in ``what_to_do`` is how the reader states an image's stain (:func:`review_advice`)."""

    words: str
    kind: str
    what_to_do: str


# How a reader of the advice states one image's stain (review_advice's stain_fix), by where the results come from.
# pdl1 run: its --stain states every image's stain at once, right only where the run is of one stain.
RUN_STAIN_FIX = (
    "set its image type in QuPath (Image tab: Image type), or pass --stain he|ihc where every image of the run is of "
    "that stain (it states them all), and run again"
)
# An image of a case of both stains (pdl1 run's pairs): --stain would state its partner's stain too.
CASE_STAIN_FIX = (
    "set that image's type in QuPath (Image tab: Image type; plain slides have none: analyse them as entries of a "
    "QuPath project) and run again; --stain would state every image's stain, its partner's too"
)
# pdl1_analyze.groovy in QuPath (the service's results, the script's records in the report): no --stain there.
SCRIPT_STAIN_FIX = "set its image type in QuPath (Image tab: Image type) and run pdl1_analyze.groovy again"


# In the order said: the stain first (on the wrong stain every other number is meaningless, and the image out of the
# model's domain for that reason alone), then the model's own trust, the tissue, and the maps.
ADVICE: tuple[Advice, ...] = (
    Advice(
        "the colour says",
        "stated stain contradicted by the colour",
        "check the stain stated against the slide: a model run on the wrong stain gives meaningless numbers; if it "
        "is wrong: {stain_fix}",
    ),
    Advice(
        "by a weak margin",
        "stain told from the colour by a weak margin",
        "it could be wrong (H&E or H-DAB); if it is: {stain_fix}",
    ),
    Advice(
        "pixel size: ",
        "pixel size unlike the file's",
        "the image was analysed at the pixel size QuPath has for it, which differs from the one its file states: cell "
        "sizes, counts and areas follow it; if QuPath's is wrong, set it right (Image tab: Pixel width/height) and run "
        "again",
    ),
    Advice(
        "out of the training domain of",
        "out of the model's training domain",
        "it has not seen slides like this one (stain, scanner, tissue) and may be wrong without knowing it: check "
        "its results, and teach it your slides (README: Train on your own slides)",
    ),
    Advice(
        "nuclei uncertainty",
        "nuclei uncertainty",
        "the IHC model is unsure of its cell calls: check some 'Tumor: 1+', '2+', '3+' and 'Tumor: Negative' cells "
        "(their 'Predictive entropy' is highest where it is least sure; a positive call with a low 'DAB membrane OD "
        "75th percentile' may be a negative cell in background DAB); where it is wrong, mark points and fine-tune it: "
        "`pdl1 train nuclei PROJECT --stain ihc --out DIR`, then `pdl1 run --ihc-model DIR`",
    ),
    Advice(
        "fewer than 100 tumour cells",
        "fewer than 100 tumour cells",
        "a TPS needs at least 100 viable tumour cells: analyse a larger area, or report the sample as inadequate",
    ),
    Advice(
        "suspect tissue detection",
        "suspect tissue detection",
        "the tissue found may not be all the tissue there: check the 'PD-L1 analysis' outline against the slide",
    ),
    Advice(
        "segmentation uncertainty",
        "segmentation uncertainty",
        "the H&E ensemble disagrees with itself over much of the tissue: check the 'PD-L1 positive' regions where the "
        "'PD-L1 uncertainty' tiles are brightest; corrected regions retrain it (`pdl1 train seg PROJECT "
        "--from-review --out DIR`)",
    ),
    Advice(
        "SUA candidate area",
        "SUA candidate area",
        "look at the 'PD-L1 FN candidate' annotations: areas called negative that may be positive",
    ),
    Advice(
        "small predicted positive area",
        "small predicted positive area",
        "little or nothing was called positive: look for small positive nests missed near the 1 % cut-off",
    ),
    Advice(
        "away from tumour cells",
        "positive area away from tumour cells",
        "the TPS counts tumour cells only: check the 'PD-L1 positive' regions outside the tumour (stroma, immune "
        "cells?)",
    ),
    Advice(
        "members disagree on the TPS category",
        "members disagree on the TPS category",
        "the predicted TPS lies near a cut-off (1 % or 50 %): score this case on its PD-L1 IHC",
    ),
    Advice(
        "unsettled positive area",
        "unsettled positive area",
        "much of the positive area lies near the model's threshold: its extent is uncertain, check its edges",
    ),
    # A case's (an H&E and its PD-L1 IHC, pdl1/pairs.json), said under the case table.
    Advice(
        "no sure reference",
        "the case's IHC needs review",
        "the IHC the H&E is compared with is flagged itself: settle the IHC first (its reasons are above), then the "
        "comparison",
    ),
    Advice(
        "H&E-predicted TPS category",
        "H&E and IHC in other TPS categories",
        "the IHC's TPS is the measurement: compare the H&E's 'PD-L1 positive' regions with the IHC's positive area "
        "mapped onto it (the H&E's .ihc_positive.geojson in pdl1/pairs/)",
    ),
)


def review_advice(reasons: Iterable[str], *, stain_fix: str) -> list[str]:
    """What to do about ``reasons`` (review reason texts, as ``pdl1 run`` prints them): each kind's advice once, in
    the order of :data:`ADVICE`; a reason of no known kind gets none. ``stain_fix``: how the reader states an
    image's stain (:data:`RUN_STAIN_FIX`, :data:`CASE_STAIN_FIX`, :data:`SCRIPT_STAIN_FIX`).

    >>> said = review_advice(["C-4: fewer than 100 tumour cells (40)", "nuclei uncertainty (0.9, limit 0.7)"],
    ...                      stain_fix=RUN_STAIN_FIX)
    >>> [line[:40] for line in said]
    ['nuclei uncertainty: the IHC model is uns', 'fewer than 100 tumour cells: a TPS needs']
    >>> (weak,) = review_advice(["stain told from the colour (H&E) by a weak margin"], stain_fix=SCRIPT_STAIN_FIX)
    >>> weak.endswith("if it is: " + SCRIPT_STAIN_FIX)
    True
    """
    texts = list(reasons)
    said = [a for a in ADVICE if any(a.words in text for text in texts)]
    return [f"{a.kind}: {a.what_to_do.format(stain_fix=stain_fix)}" for a in said]
