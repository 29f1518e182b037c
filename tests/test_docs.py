"""The README is what newcomers run: its configuration table is the settings class's, and the
files it points at exist."""

from __future__ import annotations

import re
from pathlib import Path

from autoannotator.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_configuration_table_is_generated_from_the_settings() -> None:
    assert settings_table() in README, "regenerate it with autoannotator.settings.settings_table()"


def test_readme_links_and_pictures_point_at_files_in_the_repo() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which is missing"


def test_readme_first_commands_are_make_targets() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    for target in re.findall(r"^make (\S+)", first_block, re.M):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target} is not a target"
