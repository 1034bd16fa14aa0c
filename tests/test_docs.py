"""The documentation's links: README.md and docs/**/*.md point only at files in the repository."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]

# [text](target) and ![alt](target), the text allowing one level of nested brackets (a badge
# image inside a link); the target may be <wrapped>, carry balanced parentheses and a "title".
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
    r"\(\s*(<[^<>\n]*>|(?:[^()\s]|\([^()\s]*\))*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?\s*\)"
)
# [label]: target  (reference-style definitions)
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^<>\n]*>|\S+)", re.MULTILINE)
FENCED_CODE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
EXTERNAL = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# a relative path that climbs out of its folder, in prose or code: ../shared/golden
PARENT_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.@%+-][\w./@%+-]*)")


def documentation_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return INLINE_CODE.sub("", FENCED_CODE.sub("", text))


def link_targets(text: str) -> list[str]:
    """Every link target of a Markdown text, as written (code excluded)."""
    text = strip_code(text)
    targets = [m.group(1) for m in INLINE_LINK.finditer(text)]
    targets += [m.group(1) for m in REFERENCE_LINK.finditer(text)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in targets]


def local_path(target: str) -> str | None:
    """The file part of a relative link; None for web/mail links and same-page anchors."""
    if EXTERNAL.match(target) or target.startswith("#"):
        return None
    return unquote(target.split("#", 1)[0].split("?", 1)[0])


def is_inside(path: Path, root: Path = REPO) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def problem(source: Path, target: str) -> str | None:
    """Why a link from `source` to `target` is broken, or None when it is fine."""
    path = local_path(target)
    if path is None:
        return None
    if path == "":
        return f"{target!r} is empty"
    if SCHEME.match(path):
        return f"{target!r} uses a scheme other than http(s)/mailto"
    if path.startswith("/"):
        return f"{target!r} is absolute; links must be relative to the file"
    resolved = (source.parent / path).resolve()
    if not is_inside(resolved):
        return f"{target!r} points outside the repository ({resolved})"
    if not resolved.exists():
        return f"{target!r} does not exist ({resolved.relative_to(REPO.resolve())})"
    return None


DOCS = documentation_files()


def test_the_documentation_is_there():
    names = [str(path.relative_to(REPO)) for path in DOCS]
    assert all(path.is_file() for path in DOCS), names
    assert "README.md" in names
    assert "docs/design.md" in names


def relative_links(source: Path) -> list[str]:
    return [
        t for t in link_targets(source.read_text(encoding="utf-8")) if local_path(t) is not None
    ]


@pytest.mark.parametrize("source", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(source):
    problems = [p for p in (problem(source, t) for t in relative_links(source)) if p]
    assert not problems, f"{source.relative_to(REPO)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", ["README.md", "docs/design.md"])
def test_the_main_documents_have_relative_links(name):
    """Guards the two tests above against a parser that silently finds nothing."""
    assert relative_links(REPO / name), f"{name}: no relative links found; is the parser broken?"


def test_nothing_in_the_documentation_points_outside_the_repository():
    """No link, and no path in prose or code, leaves the repository (e.g. ../shared)."""
    checked = 0
    outside = []
    for source in DOCS:
        text = source.read_text(encoding="utf-8")
        for target in link_targets(text):
            path = local_path(target)
            if path is None:
                continue
            checked += 1
            if path.startswith("/") or not is_inside(source.parent / path):
                outside.append(f"{source.relative_to(REPO)}: link {target!r}")
        for line_number, line in enumerate(text.splitlines(), 1):
            for match in PARENT_PATH.finditer(line):
                checked += 1
                if not is_inside(source.parent / match.group(1)):
                    where = f"{source.relative_to(REPO)}:{line_number}"
                    outside.append(f"{where}: path {match.group(1)!r}")
    assert checked, "no links or paths were checked at all"
    assert not outside, "points outside the repository:\n" + "\n".join(outside)


# The checks themselves, on text whose answers are known (so they cannot pass vacuously).

SAMPLE = """\
See [the design](docs/design.md#semantics), ![a figure](docs/findings/attention/frontier.png "t"),
[web](https://example.org/x), [mail](mailto:a@b.c), [anchor](#quick-start),
[<spaced>](<docs/design.md>), [[nested] text](README.md), [the spec](../shared/DESIGN.md).

```bash
cat [not](a-link.md)
```
and `[not](a-link-either.md)` in code.

[ref]: tests/golden/README.md
"""


def test_the_link_parser_finds_every_kind_of_link():
    assert link_targets(SAMPLE) == [
        "docs/design.md#semantics",
        "docs/findings/attention/frontier.png",
        "https://example.org/x",
        "mailto:a@b.c",
        "#quick-start",
        "docs/design.md",
        "README.md",
        "../shared/DESIGN.md",
        "tests/golden/README.md",
    ]


def test_the_checks_reject_what_they_should():
    readme = REPO / "README.md"
    assert problem(readme, "docs/design.md#semantics") is None
    assert problem(readme, "https://example.org/x") is None
    assert problem(readme, "#quick-start") is None
    assert "outside the repository" in problem(readme, "../shared/DESIGN.md")
    assert "outside the repository" in problem(readme, "docs/../../shared/golden")
    assert "does not exist" in problem(readme, "docs/no-such-file.md")
    assert "absolute" in problem(readme, "/etc/passwd")
    found = [m.group(1) for m in PARENT_PATH.finditer("in `../shared/golden` and ../x.md, a/../b")]
    assert found == ["../shared/golden", "../x.md"]


def readme_python_snippets() -> list[str]:
    """The ```python blocks of README.md, in order."""
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_python_snippets_run_as_written(shipped_live, run_cli, tmp_path, monkeypatch):
    """Every snippet runs; those that call `collabvit serve` at its default address reach a
    live `collabvit serve` of the shipped server instead (the default port may be taken
    here), the device's snippet finds the folder README's `collabvit export` writes, and
    evaluations run on fewer images (what they print is not checked here)."""
    monkeypatch.chdir(tmp_path)
    assert run_cli("export", "--out-dir", "edge-export").returncode == 0
    snippets = readme_python_snippets()
    assert len(snippets) >= 4
    address = shipped_live.url.removeprefix("http://")
    for snippet in snippets:
        snippet = re.sub(r"\blimit=\d+", "limit=64", snippet.replace("127.0.0.1:8000", address))
        exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
