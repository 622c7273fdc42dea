"""The repository has what its metadata and README point at."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_license_pyproject_names_is_in_the_repository():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text  # the full text


def test_the_readme_links_only_to_files_in_the_repository():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", readme)
    local = [t for t in targets if not re.match(r"https?://", t)]
    assert local, "expected some links to files"
    for target in local:
        assert not target.startswith(("/", "..")), target
        assert (REPO / target.split("#")[0]).exists(), target


def test_the_readme_installs_the_service_into_a_virtual_environment():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Install as a service", 1)[1].split("\n## ", 1)[0]
    assert "python3 -m venv /opt/velod" in section
    assert "\npip install" not in section  # no install into the system Python
