"""docs/settings.md is generated from the settings code and must match it; every setting is described."""

from __future__ import annotations

from pathlib import Path

from streamer.settings import setting_variables
from tools.settings_doc import OUT, render, undocumented

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_settings_table_matches_the_code():
    assert OUT.read_text() == render(), "docs/settings.md is stale: run python -m tools.settings_doc"


def test_every_setting_is_described_and_listed_with_its_variable():
    assert undocumented() == []
    table = OUT.read_text()
    assert all(f"`{var}`" in table for var in setting_variables())


def test_readme_stays_a_deployers_page():
    text = README.read_text()
    assert len(text.encode()) < 15_000, f"README is {len(text.encode())} bytes"
    assert text.index("## Run it against your Kafka") < text.index("## The two commands")
    for linked in ("docs/settings.md", "docs/messages.md", "docs/operations.md"):
        assert linked in text and (README.parent / linked).is_file()
