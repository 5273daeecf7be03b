"""MkDocs hook: the repository files the documentation links to, built into the site.

The guides link to files outside ``docs/`` the way they are linked on GitHub, relative to the page
(``../experiments/README.md``, ``../benchmarks/RESULTS.md``, ``../examples/conv_lora_digits.py``). This hook
finds every such link (in the pages and in ``nav``), and adds the file to the build under its own
``../<path>`` source path, so MkDocs resolves and checks the link as usual, and writes it to
``site/repo/<path>`` (a Markdown file becomes a page). The added Markdown files are scanned too, so the
generated lab report brings its tables, plots and CSVs along.

The added pages are generated elsewhere (``python -m experiments report``, ``python -m benchmarks.run``) and
are not edited here. A link inside one of them that points at nothing (a generator bug) is turned into
plain text and reported at INFO level, so it does not fail ``mkdocs build --strict``; a broken link in a
page under ``docs/`` still does. Nothing is fetched: the hook only reads files of this repository.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

log = logging.getLogger("mkdocs.hooks.repo_files")

# [text](target) and ![alt](target); the target ends at whitespace or ')'
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
PREFIX = "repo"  # site/repo/<path> holds the repository files the docs link to

_mounted: set[str] = set()  # src_uris added by this hook ("../experiments/README.md", ...)


def _relative_target(src_uri: str, url: str) -> str | None:
    """The src_uri a relative link resolves to (as MkDocs computes it), or None for external/anchor links."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith(("/", "#")):
        return None
    path = url.split("#", 1)[0].split("?", 1)[0]
    if not path:
        return None
    return posixpath.normpath(posixpath.join(posixpath.dirname(src_uri), path))


def _links(markdown: str) -> list[str]:
    return [m.group(3) for m in LINK.finditer(FENCE.sub("", markdown))]


def _dest_uri(repo_path: str, use_directory_urls: bool) -> str:
    """Where a repository file goes in the site: README.md -> index.html, other pages as MkDocs places them."""
    parent, name = posixpath.split(repo_path)
    stem, ext = posixpath.splitext(name)
    if ext != ".md":
        return posixpath.join(PREFIX, repo_path)
    if stem in ("README", "index"):
        return posixpath.join(PREFIX, parent, "index.html")
    if use_directory_urls:
        return posixpath.join(PREFIX, parent, stem, "index.html")
    return posixpath.join(PREFIX, parent, stem + ".html")


def _nav_paths(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_paths(v)]
    if isinstance(nav, list):
        return [p for v in nav for p in _nav_paths(v)]
    return []


def on_files(files: Files, config) -> Files:
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    _mounted.clear()
    queue: list[tuple[str, str]] = []  # (src_uri of the linking page, link)
    for f in files:
        if f.is_documentation_page():
            queue += [(f.src_uri, url) for url in _links(f.content_string)]
    in_nav = {posixpath.normpath(p) for p in _nav_paths(config["nav"] or [])}
    queue += [("", path) for path in sorted(in_nav)]
    while queue:
        src_uri, url = queue.pop()
        target = _relative_target(src_uri, url)
        if target is None or not target.startswith("../") or files.get_file_from_path(target) is not None:
            continue
        path = (docs / target).resolve()
        if root not in path.parents or docs in path.parents or not path.is_file():
            continue  # outside the repository, back inside docs/, or missing: MkDocs reports it as usual
        repo_path = path.relative_to(root).as_posix()
        # a "../" path would count as a hidden file and be excluded: say explicitly that it is in the site
        inclusion = (
            InclusionLevel.NOT_IN_NAV if path.suffix == ".md" and target not in in_nav else InclusionLevel.INCLUDED
        )
        file = File(
            target,
            str(docs),
            config["site_dir"],
            config["use_directory_urls"],
            dest_uri=_dest_uri(repo_path, config["use_directory_urls"]),
            inclusion=inclusion,
        )
        files.append(file)
        _mounted.add(target)
        if path.suffix == ".md":
            queue += [(target, link) for link in _links(path.read_text(encoding="utf-8"))]
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """In a page added from outside docs/, a link to nothing becomes plain text (reported at INFO level)."""
    if page.file.src_uri not in _mounted:
        return markdown

    def fix(m: re.Match) -> str:
        bang, text, url = m.group(1), m.group(2), m.group(3)
        target = _relative_target(page.file.src_uri, url)
        if target is None or files.get_file_from_path(target) is not None:
            return m.group(0)
        log.info("generated file %s links to %s, which is not in the site: shown as text", page.file.src_uri[3:], url)
        return f"{text} (`{url}`)" if bang else text

    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[ \t]*$)", markdown, flags=re.S | re.M)
    return "".join(p if i % 2 else LINK.sub(fix, p) for i, p in enumerate(parts))
