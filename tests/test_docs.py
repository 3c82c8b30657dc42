"""The README and docs/ agree with the repository: links, anchors, section references, defaults.

- Every relative link (``[text](path)``, ``[text](path#anchor)``, ``[text](#anchor)``, images,
  reference-style links) in README.md, docs/*.md and bench/README.md resolves to a file or folder inside the
  repository, and every anchor to a heading of the target page (GitHub's anchor slugs).
- Section references name sections that exist: no numbered ``§`` references (the docs have no
  numbered sections) and no document outside the repository; ``README, "Title"`` names a README
  heading.
- Every default the docs give for a ``KIE_*`` setting (the README's configuration table, and
  inline "``KIE_X`` (30 s)" / "(default 100,000)" mentions) is config.py's default.
- Every program under examples/ is run by a test; the package's licence is an SPDX string.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from kie_extend.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:id|name)=\"([^\"]+)\"", re.I)
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The page without fenced code blocks (links and references there are code, not links)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, lower case,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_" or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
        elif ch == " ":
            kept.append("-")
    return "".join(kept)


def anchors(page: Path) -> set[str]:
    """Every anchor a page has: heading slugs (repeats numbered -1, -2, … as GitHub does) and HTML ids."""
    text = prose(page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(text):
        base = slug(title)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    out.update(HTML_ANCHOR.findall(text))
    return out


def links(page: Path) -> list[str]:
    text = prose(page.read_text())
    return INLINE_LINK.findall(text) + REF_LINK.findall(text)


def test_the_pages_exist_and_have_links() -> None:
    assert (ROOT / "README.md").exists() and len(PAGES) >= 3
    assert sum(len(links(p)) for p in PAGES) > 20  # the parser finds the links it must check


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_is_closed(page: Path) -> None:
    """An unclosed fence swallows the rest of the page, headings (and so anchors) included."""
    left = [n for n, line in enumerate(prose(page.read_text()).splitlines(), 1) if re.match(r"(```|~~~)", line)]
    assert not left, f"{page.relative_to(ROOT)}: a code fence is never closed"


def test_slugs_follow_github() -> None:
    assert slug("Pauses (401 / 402)") == "pauses-401--402"
    assert slug("4. Bulk enqueue with `kie_extend.enqueue_many`") == "4-bulk-enqueue-with-kie_extendenqueue_many"
    assert slug("Sharing one account: tenants, priorities, batches") == "sharing-one-account-tenants-priorities-batches"
    assert slug("High availability (Redis Sentinel)") == "high-availability-redis-sentinel"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    problems = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not a page")
            elif anchor not in anchors(dest):
                problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_reference_resolves(page: Path) -> None:
    text = page.read_text()
    problems = [f"numbered section reference {m.group(0)!r}: these pages have no numbered sections"
                for m in re.finditer(r"(?:DESIGN\s*)?§\s*\d+(?:\s*/\s*§?\d+)*", text)]
    problems += [f"{m.group(0)!r}: a document that is not in the repository"
                 for m in re.finditer(r"\bDESIGN(?:\.md)?\b", text)]
    readme_titles = {re.sub(r"[`*]", "", t).strip().lower() for _, t in HEADING.findall(prose(
        (ROOT / "README.md").read_text()))}
    for m in re.finditer(r"README(?:\.md)?(?:'s)?,?\s+\"([^\"]+)\"", text):
        if m.group(1).strip().lower() not in readme_titles:
            problems.append(f"{m.group(0)!r}: no such README section")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


# ----- documented defaults against config.py ---------------------------------------------------------

TABLE_ROW = re.compile(r"^\|\s*`(KIE_[A-Z0-9_]+)`\s*\|\s*([^|]*?)\s*\|", re.M)
NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?\s*(?:ms|s|min|m|h|d|KB)?"
INLINE_DEFAULT = re.compile(r"`(KIE_[A-Z0-9_]+)`[^.;\n`|]{0,40}?(?:\((?:default\s+)?(" + NUMBER + r")\)"
                            r"|,\s*default\s+(" + NUMBER + r")\b)")


def _normalise(value: str) -> str:
    value = value.replace(",", "").replace(" ", "")
    if value.endswith("KB"):
        return str(int(float(value[:-2]) * 1024))
    return re.sub(r"min$", "m", value)


def _field(env_name: str) -> str | None:
    name = env_name[len("KIE_"):].lower()
    return name if name in Settings.model_fields else None


def _default(field: str) -> Any:
    return getattr(Settings(_env_file=None), field)


def _parsed(field: str, value: str) -> Any:
    return getattr(Settings(_env_file=None, **{field: value}), field)


def documented_defaults() -> list[tuple[str, str, str]]:
    """(page, variable, documented default) for every default the pages state."""
    out = []
    for page in PAGES:
        text = page.read_text()
        rel = str(page.relative_to(ROOT))
        for name, cell in TABLE_ROW.findall(text):
            out.append((rel, name, cell))
        for m in INLINE_DEFAULT.finditer(prose(text)):
            out.append((rel, m.group(1), "`" + _normalise(m.group(2) or m.group(3)) + "`"))
    return out


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("KIE_")]:
        monkeypatch.delenv(key)


def test_documented_defaults_match_config(clean_env: None) -> None:
    rows = documented_defaults()
    assert len(rows) > 50  # the configuration table and the inline mentions were found
    problems = []
    checked = 0
    for page, name, cell in rows:
        field = _field(name)
        if field is None:
            if page == "README.md" and cell != "default":  # a table row must be a real setting
                problems.append(f"{page}: {name} is documented but config.py has no such setting")
            continue
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if cell.lower() == "none":
            if _default(field) not in (None, "", [], (), {}):
                problems.append(f"{page}: {name} documented without a default; config.py: {_default(field)!r}")
            checked += 1
        elif literal:
            try:
                documented = _parsed(field, literal.group(1))
            except Exception as exc:  # noqa: BLE001 - the documented value does not even parse
                problems.append(f"{page}: {name} default {cell} is not a valid value: {exc}")
                continue
            if documented != _default(field):
                problems.append(f"{page}: {name} documented default {cell} = {documented!r}; "
                                f"config.py: {_default(field)!r}")
            checked += 1
    assert checked > 50
    assert not problems, "\n".join(problems)


def test_every_setting_is_in_the_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = {name for name, _ in TABLE_ROW.findall(readme)}
    missing = sorted(f"KIE_{f.upper()}" for f in Settings.model_fields if f"KIE_{f.upper()}" not in documented)
    assert not missing, f"settings without a row in the README's configuration table: {missing}"


# ----- examples and packaging ------------------------------------------------------------------------

def test_every_example_program_is_run_by_a_test() -> None:
    programs = [p for p in (ROOT / "examples").rglob("*") if p.suffix in (".py", ".js", ".go", ".sh")
                and "node_modules" not in p.parts]
    assert programs
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    untested = [str(p.relative_to(ROOT)) for p in programs if p.name not in tests]
    assert not untested, f"example programs no test runs: {untested}"


def test_the_licence_is_an_spdx_expression() -> None:
    """setuptools >= 77 takes ``license = "MIT"``; the old table form prints a deprecation warning."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+).*", r) and int(re.match(r"setuptools>=(\d+)", r)[1]) >= 77
               for r in requires), requires
    assert not any("License ::" in c for c in project["project"].get("classifiers", []))


# ----- documented shapes against the code ------------------------------------------------------------

def _top_level_keys(block: str) -> set[str]:
    """The keys of the outermost object of a JSON-like example (placeholders such as … allowed)."""
    keys, depth, i = set(), 0, 0
    while i < len(block):
        ch = block[i]
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == '"':
            end = block.index('"', i + 1)
            if depth == 1 and block[end + 1:].lstrip().startswith(":"):
                keys.add(block[i + 1:end])
            i = end
        i += 1
    return keys


def _json_block_after(text: str, marker: str) -> str:
    start = text.index(marker)
    block = text[text.index("```json", start) + len("```json"):]
    return block[:block.index("```")]


def test_the_documented_status_record_and_event_have_the_codes_fields() -> None:
    from kie_extend.jobs.events import build_event, status_record
    from kie_extend.jobs.states import JobState

    readme = (ROOT / "README.md").read_text()
    record = _top_level_keys(_json_block_after(readme, "`kie-extend status JOB_ID --json` (or `kie_extend.get_job`)"))
    assert record == set(status_record({}, "j")), "README's status record example"
    event = _top_level_keys(_json_block_after(readme, "## Result events and handlers"))
    assert event == set(build_event({"job_id": "j"}, JobState.SUCCEEDED, {})), "README's result event example"
    producers = (ROOT / "docs" / "producers.md").read_text()
    documented = set(re.findall(r"^\| `(job\.\w+|batch\.\w+)` \|", producers, re.M))
    assert documented == {"job.succeeded", "job.failed", "job.cancelled", "batch.finished"}
    from kie_extend.jobs.states import EVENT_FOR

    assert set(EVENT_FOR.values()) | {"batch.finished"} == documented
    lua = (ROOT / "src" / "kie_extend" / "store/lua.py").read_text()
    batch_fields = set(re.findall(r"(\w+) = ", lua[lua.index("cjson.encode({event = 'batch.finished'"):][:200]))
    row = next(line for line in producers.splitlines() if line.startswith("| `batch.finished`"))
    assert all(f"`{name}`" in row for name in batch_fields), (batch_fields, row)


def test_no_source_refers_to_a_design_file_outside_the_repository() -> None:
    """Docstrings end up in the OpenAPI document and in help texts: they must not cite a file users do not have."""
    problems = []
    for path in sorted((ROOT / "src").rglob("*.py")) + [ROOT / "docs" / "openapi.json"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bDESIGN(?:\.md)?\b|§\s*\d", line):
                problems.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not problems, "\n".join(problems)
