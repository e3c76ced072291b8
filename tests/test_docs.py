"""The documentation builds without a warning, and the README stays a small front door whose links work.

`mkdocs build --strict` (settings in mkdocs.yml) fails on a link between pages that points nowhere, an
anchor a page does not have, or a page missing from the nav. The README is not part of the site, so its
links are checked here: each relative link names an existing file, and each anchor into a docs page is an
id of the page mkdocs rendered.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_BYTES = 16_000

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_ID = re.compile(r'\bid="([^"]+)"')


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built by `mkdocs build --strict` from the checkout's mkdocs.yml."""
    site_dir = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert not warnings, "mkdocs warned:\n" + "\n".join(warnings)
    return site_dir


def _readme_links() -> list[str]:
    text = _FENCE.sub("", README.read_text(encoding="utf-8"))
    return [m.group(1) for m in _LINK.finditer(text)]


def _relative(link: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", link) and not link.startswith("#")


def test_docs_build_strict_without_warnings(site):
    pages = {p.stem for p in (REPO / "docs").glob("*.md")}
    built = {p.parent.name for p in site.glob("*/index.html")} | {"index"}
    assert pages <= built, f"pages not built: {sorted(pages - built)}"


def test_readme_is_a_front_door_of_at_most_16000_bytes():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes; move details into docs/"


def test_readme_relative_links_point_to_existing_files():
    links = [link for link in _readme_links() if _relative(link)]
    assert links, "the README should link to the docs"
    missing = [link for link in links if not (REPO / link.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_anchors_into_docs_exist_in_the_built_pages(site):
    broken = []
    for link in _readme_links():
        if not _relative(link) or "#" not in link:
            continue
        path, anchor = link.split("#", 1)
        page = Path(path)
        assert page.parts[0] == "docs" and page.suffix == ".md", f"anchor outside docs/: {link}"
        stem = page.relative_to("docs").with_suffix("")
        html = site / ("index.html" if stem.name == "index" else f"{stem}/index.html")
        if anchor not in _ID.findall(html.read_text(encoding="utf-8")):
            broken.append(link)
    assert not broken, f"README links to anchors the docs do not have: {broken}"
