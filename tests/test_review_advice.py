"""What to do about each review reason (bridge.review_advice): every reason an image's analysis can give has advice."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.review_advice import ADVICE, CASE_STAIN_FIX, RUN_STAIN_FIX, SCRIPT_STAIN_FIX, review_advice

ROOT = Path(__file__).resolve().parents[1]
# Where an image's review reasons are written (inference/analysis/pairs.py's are a pair's, said with the pair).
REASON_SOURCES = ("inference/pipeline.py", "inference/analysis/domain.py", "inference/slides/tissue.py")


def _written_reasons() -> list[str]:
    """The reason texts these sources write as literals, each placeholder of an f-string filled with 'X'."""
    texts = []
    for source in REASON_SOURCES:
        for literal in re.findall(r'"reason":\s*f?"([^"]*)"', (ROOT / source).read_text(encoding="utf-8")):
            texts.append(re.sub(r"\{[^}]*\}", "X", literal))
    return texts


def test_the_sources_still_write_their_reasons_as_literals():
    # Else the next test would pass on nothing: the scan found the reasons it was written against.
    found = _written_reasons()
    assert len(found) >= 7 and "nuclei uncertainty" in found
    assert "out of the training domain of X: stain vectors (degrees)" in found


@pytest.mark.parametrize("reason", _written_reasons())
def test_every_written_review_reason_has_advice(reason):
    assert review_advice([reason], stain_fix=RUN_STAIN_FIX), (
        f"no advice for the review reason {reason!r}: add it to ADVICE"
    )


def test_every_map_review_reason_has_advice():
    from inference.pipeline import REVIEW_REASONS

    for reason in REVIEW_REASONS.values():
        said = review_advice([f"{reason} (0.1, limit 0.05)"], stain_fix=RUN_STAIN_FIX)
        assert said, f"no advice for {reason!r}: add it to ADVICE"


def test_each_kind_is_said_once_in_the_order_of_advice_with_a_target_prefix_or_numbers():
    reasons = [
        "C-4: fewer than 100 tumour cells (40, limit 100)",
        "out of the training domain of pdl1-nuclei-ihc: network features (3.1, limit 2.5)",
        "C-5: fewer than 100 tumour cells (12, limit 100)",
        "a reason no advice knows",
    ]
    said = review_advice(reasons, stain_fix=RUN_STAIN_FIX)
    kinds = [line.split(":")[0] for line in said]
    assert kinds == ["out of the model's training domain", "fewer than 100 tumour cells"]
    assert review_advice([], stain_fix="") == [] and review_advice(["a reason no advice knows"], stain_fix="") == []


def test_no_two_kinds_claim_one_reason():
    # A reason matched by two kinds would get the first's advice only, silently.
    for advice in ADVICE:
        others = [a.kind for a in ADVICE if a is not advice and a.words in advice.words]
        assert not others, f"{advice.kind!r} also matches {others}"
    for reason in _written_reasons():
        assert sum(a.words in reason for a in ADVICE) == 1, reason


@pytest.mark.parametrize("fix", [RUN_STAIN_FIX, CASE_STAIN_FIX, SCRIPT_STAIN_FIX])
def test_the_stain_advice_is_the_readers_own_fix(fix):
    # It said "or --stain" and "pass --stain he|ihc" to everyone: a QuPath user of pdl1_analyze.groovy has no
    # --stain, and for one image of a case (pdl1 run's pairs) --stain states its partner's stain too.
    reasons = [
        "stain: QuPath's image type BRIGHTFIELD_H_DAB says H-DAB, the colour says H&E",
        "stain told from the colour (H&E) by a weak margin: state it in QuPath",
    ]
    contradicted, weak = review_advice(reasons, stain_fix=fix)
    assert contradicted.startswith("stated stain contradicted by the colour: check the stain stated against")
    assert contradicted.endswith(f"; if it is wrong: {fix}") and weak.endswith(f"; if it is: {fix}")
    assert ("--stain he|ihc where every image of the run is of that stain" in fix) == (fix == RUN_STAIN_FIX)
    if fix == SCRIPT_STAIN_FIX:
        assert "--stain" not in contradicted + weak
