"""Groovy scripts run inside QuPath (0.4.4 to 0.7); shipped as package data so `pdl1 init-project` can copy them."""

from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent


def script_paths() -> list[Path]:
    return sorted(SCRIPTS_DIR.glob("*.groovy"))
