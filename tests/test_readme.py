"""The README is a page for a new user: under 300 lines, with the two make commands that exist, a figure that is
shipped, the whole table of where the paper and its official code disagree, the reasons for each optional extra,
the citation, and links to every page of docs/. (The reference material is checked by tests/test_docs.py.)"""

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def text() -> str:
    return README.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the README's section ``## title`` (up to the next ``## ``)."""
    parts = re.split(r"^## (.+)$", text(), flags=re.M)
    sections = {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}
    assert title in sections, f"no section '## {title}' in README.md"
    return sections[title]


def make_targets() -> dict[str, list[str]]:
    """``{target: [recipe lines]}`` of the Makefile."""
    targets, current = {}, None
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([\w.-]+):", line)
        if m:
            current = targets.setdefault(m.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
    return targets


def test_the_readme_is_a_page():
    assert len(text().splitlines()) < 300


def test_the_two_commands_are_make_targets_that_run_the_demo_and_the_tests():
    commands = re.findall(r"^make (\w+)", section("The two commands"), flags=re.M)
    assert commands == ["demo", "test"]
    targets = make_targets()
    assert any(re.search(r"\blinft demo\b", line) for line in targets["demo"])
    assert any(re.search(r"-m pytest\b", line) for line in targets["test"])


def test_the_figure_is_a_png_shipped_in_docs():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text())
    assert images, "no figure in README.md"
    for image in images:
        path = ROOT / image
        assert path.parent == ROOT / "docs" / "img" and path.suffix == ".png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image


def test_the_disagreement_table_is_whole():
    rows = [line for line in section("Where the paper and its official code disagree").splitlines()
            if line.startswith("|")]
    assert rows[0] == "| question | paper text | official code | linft |"
    body = rows[2:]
    assert len(body) >= 17
    for row in body:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 4 and all(cells), row


def test_every_optional_extra_has_its_reason_in_the_readme():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {name for name in config["options.extras_require"] if name != "test"}
    dependencies = section("Dependencies")
    assert extras
    for extra in extras:
        item = re.search(rf"^\* .*\(extra `{extra}`[,)].*?(?=^\* |\Z)", dependencies, flags=re.M | re.S)
        assert item, f"extra '{extra}' has no item in the README's Dependencies"
        assert len(item.group(0).split()) >= 30, f"extra '{extra}': say why it is needed and what it replaces"


def test_the_paper_is_cited():
    citing = section("Citing")
    assert "```bibtex" in citing and "2403.00946" in citing and "Fine-tuning with Very Large Dropout" in citing


def test_the_readme_links_every_page_of_docs():
    linked = {(README.parent / t).resolve() for t in re.findall(r"\]\(([^)#\s]+)", text())}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")} | {(ROOT / "benchmarks" / "README.md").resolve(),
                                                                  (ROOT / "CHANGELOG.md").resolve()}
    assert not pages - linked, sorted(str(p.relative_to(ROOT)) for p in pages - linked)
