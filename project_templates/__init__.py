"""What a new PD-L1 QuPath project starts with: class list with colours and a default config."""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent
PDL1_TEMPLATE = TEMPLATES_DIR / "pdl1"
