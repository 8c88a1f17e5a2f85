#!/usr/bin/env python3
r"""Build the bundled English prose corpus offline from permissively licensed Debian documentation.

Recipe (deterministic for the same .deb files and seed):
  1. `apt-get download` the pinned documentation packages (or reuse --deb-dir) and `dpkg -x` them.
  2. Turn every HTML page into one *document*: the prose of its main content (headings, paragraphs,
     list items, definitions, admonitions), with code blocks, tables, signatures, navigation,
     sidebars and index pages dropped.  Blocks that do not look like prose are dropped too.
  3. Shuffle documents with a seeded RNG and split them BY DOCUMENT into eval / calib / train.
  4. Write train to `.corpus/train.txt` (gitignored, carried to the GPU machine for training) and
     calib / eval to `actsparse/assets/text/{calib,eval}.txt` (each under 1 MB, committed).

File format of every split: UTF-8, documents joined by a line that holds only `<|doc|>`, with one
blank line on either side:  doc1 + "\n\n<|doc|>\n\n" + doc2 + ... + "\n".  Inside a document,
paragraphs are separated by one blank line ("\n\n"); no document contains a `<|doc|>` line.
Split with `re.split(r"\n\n<\|doc\|>\n\n", text.strip("\n"))`.

Usage:  python scripts/build_corpus.py            (downloads into a temp dir)
        python scripts/build_corpus.py --deb-dir /tmp/debs --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC_SEP = "\n\n<|doc|>\n\n"
MIN_DOC_WORDS = 60  # pages with less prose are stubs or link lists
BOILERPLATE_DOCS = 10  # a >=6-word paragraph on more pages than this is boilerplate

# Pinned Debian 12 (bookworm) packages; every one is redistributable under a permissive licence.
# Exact versions make the corpus reproducible; snapshot.debian.org keeps every version forever.
@dataclass(frozen=True)
class Source:
    package: str
    version: str
    licence: str
    html_root: str  # folder inside the unpacked package
    skip: tuple[str, ...]  # regexes on the page path (relative to html_root) that are not prose pages
    include: str = r""  # regex a page path must match (default: every page)


SOURCES = (
    Source(
        "python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0 (Python Software Foundation License Version 2)",
        "usr/share/doc/python3.11/html",
        # indexes, the 1.6 MB changelog of issue titles, licence boilerplate, search/download pages
        (r"^genindex", r"^py-modindex", r"^search\.html$", r"^download\.html$", r"^contents\.html$",
         r"^whatsnew/changelog\.html$", r"^license\.html$", r"^copyright\.html$", r"^bugs\.html$",
         r"^about\.html$", r"^glossary\.html$"),
    ),
    Source(
        "postgresql-doc-15", "15.20-0+deb12u1", "PostgreSQL Licence (BSD/MIT-like)",
        "usr/share/doc/postgresql-doc-15/html",
        # index, bookindex, per-release notes (lists of commit messages), legal notice
        (r"^index\.html$", r"^bookindex\.html$", r"^release-\d", r"^legalnotice\.html$",
         r"^(appendixes|reference|sql-commands|internals|server-programming|client-interfaces|"
         r"server-applications|reference-client|reference-server|tutorial|admin|sql|"
         r"bug-reporting)\.html$"),
    ),
    Source(
        "python-django-doc", "3:3.2.25-0+deb12u7", "BSD-3-Clause",
        "usr/share/doc/python-django-doc/html",
        # indexes and ~300 near-identical point-release notes ("Django 2.2.26 fixes ...")
        (r"^genindex", r"^py-modindex", r"^search\.html$", r"^contents\.html$",
         r"^releases/\d+\.\d+\.\d+\.html$", r"^releases/security\.html$", r"^internals/deprecation\.html$"),
    ),
    Source(
        "rust-doc", "1.63.0+dfsg1-2", "MIT or Apache-2.0 (src/doc/*)",
        "usr/share/doc/rust-doc/html",
        # the mdBook books only; rustdoc API pages (core/std/alloc, ~30k pages) are signatures, not prose
        (r"(^|/)(print|toc|404)\.html$",),
        include=r"^(book|rust-by-example|edition-guide|reference|nomicon|embedded-book|rustc|rustdoc)/",
    ),
    Source(
        "sqlite3-doc", "3.40.1-2+deb12u2", "public domain",
        "usr/share/doc/sqlite3",
        (r"^(index|sitemap|docs|keyword_index|toc|changes|chronology|news|copyright|search|capi3ref|"
         r"doclist|mostdeployed|codeofconduct|codeofethics|consortium_agreement-\d+|copyright-release|"
         r"doc_\w+_crossref|lang|fileio)\.html$",
         r"^(c3ref|session|releaselog|syntax)/"),
    ),
    Source(
        "nodejs-doc", "18.20.4+dfsg-1~deb12u3", "MIT (Expat)",
        "usr/share/doc/nodejs/api",
        (r"^(all|index|documentation|synopsis|deprecations)\.html$",),
    ),
    Source(
        "cmake-doc", "3.25.1-1", "BSD-3-Clause",
        "usr/share/doc/cmake-data/html",
        (r"^genindex", r"^search\.html$", r"^index\.html$", r"^release/"),
    ),
    Source(
        "sphinx-doc", "5.3.0-4", "BSD-2-Clause",
        "usr/share/doc/sphinx-doc/html",
        (r"^genindex", r"^py-modindex", r"^search\.html$", r"^changes\.html$", r"^contents\.html$"),
    ),
    Source(
        "llvm-15-doc", "1:15.0.6-4", "Apache-2.0 WITH LLVM-exception",
        "usr/share/doc/llvm-15-doc/html",
        (r"^genindex", r"^search\.html$", r"^index\.html$", r"ReleaseNotes", r"^CommandGuide/index",
         r"^(_|doxygen)",),
    ),
    Source(
        "clang-15-doc", "1:15.0.6-4", "Apache-2.0 WITH LLVM-exception",
        "usr/share/doc/clang-15/html",
        (r"^genindex", r"^search\.html$", r"^index\.html$", r"ReleaseNotes",
         r"^(ClangCommandLineReference|AttributeReference|DiagnosticsReference|ClangFormatStyleOptions|"
         r"LibASTMatchersReference|ClangFormattedStatus)\.html$"),
    ),
    Source(
        "apache2-doc", "2.4.71-1~deb12u1", "Apache-2.0",
        "usr/share/doc/apache2-doc/manual/en",
        (r"(^|/)(index|sitemap|glossary|quickreference|directives|overrides)\.html$", r"^mod/(directives|quickreference)"),
    ),
    Source(
        "ghc-doc", "9.0.2-4", "BSD-3-Clause",
        "usr/share/doc/ghc-doc/html/users_guide",
        (r"^genindex", r"^search\.html$", r"^index\.html$", r"-notes\.html$", r"^(_|flags)"),
    ),
    Source(
        "python-pandas-doc", "1.5.3+dfsg-2", "BSD-3-Clause",
        "usr/share/doc/python-pandas-doc/html",
        # the user guide and getting-started pages; the generated API reference stays out
        (r"(^|/)index\.html$", r"cookbook", r"comparison_with_"),
        include=r"^(user_guide|getting_started)/",
    ),
    Source(
        "python-flask-doc", "2.2.2-3", "BSD-3-Clause",
        "usr/share/doc/python-flask-doc/html",
        (r"^genindex", r"^py-modindex", r"^search\.html$", r"^index\.html$", r"^(changes|license|api)\.html$"),
    ),
    Source(
        "erlang-doc", "1:25.2.3+dfsg-1+deb12u4", "Apache-2.0 (lib/edoc, lib/syntax_tools: Apache-2.0 or LGPL-2.1; lib/eldap: MIT)",
        "usr/share/doc/erlang-doc",
        # the OTP system guides and each application's user guide and reference pages
        (r"^doc/(index|man_index|applications|nyi)\.html$", r"^doc/(docbuild|pdf|js)/",
         r"(^|/)(users_guide|part|book|index|notes|release_notes|internal)\.html$", r"/doc/html/(js|pdf)/"),
        include=r"^(doc/|lib/[^/]+/doc/html/|erts-[^/]+/doc/html/)",
    ),
)

# Elements whose whole subtree is dropped: code, tables, scripts, forms, figures.
SKIP_TAGS = {"pre", "table", "script", "style", "form", "button", "nav", "svg", "figure", "math", "head", "title"}
# Classes / ids / roles of containers that are navigation, chrome, code or API signatures.
SKIP_CLASS = re.compile(
    r"(^|\s)(sphinxsidebar|sphinxsidebarwrapper|related|footer|navheader|navfooter|nav|highlight[\w-]*|"
    r"headerlink|sig|sig-object|toctree-wrapper|toc|mobile-nav|menu-wrapper|inline-search|clearer|"
    r"version_switcher_placeholder|language_switcher_placeholder|programlisting|synopsis|screen|"
    r"literallayout|cmdsynopsis|funcsynopsis|doctest|back-to-top|rubric|viewcode-link|"
    r"versionmodified|line-block|api_metadata|picker|header-container|sidebar|menu-bar|nav-wrapper|"
    r"nav-chapters|mobile-nav-chapters|example-wrap|codebox|fancy|menu|search-box|tabs)(\s|$)"
)
SKIP_ID = re.compile(r"^(hd|ft|sidebar|global-nav|searchbox|sidebarbutton|search-results|column2|gtoc|toc|"
                     r"menu-bar|menu-bar-hover-placeholder|search-wrapper|sidebar-resize-handle|leftnav|"
                     r"loadtoc)$")
# Block-level tags: text inside one of these forms one paragraph.
BLOCK_TAGS = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "div",
              "section", "dl", "ul", "ol", "br", "td", "th", "caption", "body", "article"}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class ProseExtractor(HTMLParser):
    """Collects (is_heading, text) blocks from an HTML page, skipping code, tables and chrome."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, opened a skipped subtree)
        self.skip_depth = 0
        self.buf: list[str] = []
        self.heading = False
        self.blocks: list[tuple[bool, str]] = []

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.blocks.append((self.heading, text))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            if tag == "br" and not self.skip_depth:
                self.buf.append(" ")
            return
        a = {k: (v or "") for k, v in attrs}
        skip = (tag in SKIP_TAGS or bool(SKIP_CLASS.search(a.get("class", "")))
                or bool(SKIP_ID.match(a.get("id", ""))) or a.get("role") in ("navigation", "search"))
        if tag in BLOCK_TAGS and not self.skip_depth:
            self._flush()
            if tag in HEADINGS:
                self.heading = True
        self.stack.append((tag, skip))
        if skip:
            self.skip_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS:
            return
        # HTML in the wild closes tags loosely: pop to the matching open tag if there is one.
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skip = self.stack.pop()
            if skip:
                self.skip_depth -= 1
            if t == tag:
                break
        if tag in BLOCK_TAGS and not self.skip_depth:
            self._flush()
            if tag in HEADINGS:
                self.heading = False

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            self.buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def is_prose(text: str, heading: bool) -> bool:
    """True when a block reads as English prose rather than code, a listing or a fragment."""
    if "\ufffd" in text:
        return False
    words = _WORD.findall(text)
    if heading:
        return 1 <= len(words) and len(text) <= 120
    if len(words) < 6:
        return False
    nonspace = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in nonspace)
    # identifiers, option lists and numbers push letters below ~80% of the non-space characters
    return letters / max(1, len(nonspace)) >= 0.78 and sum(len(w) for w in words) / len(words) <= 9


def page_to_document(raw: str) -> str:
    """Returns the prose of one HTML page: paragraphs joined by blank lines ('' if too little)."""
    p = ProseExtractor()
    p.feed(raw)
    p.close()
    paras: list[str] = []
    for heading, text in p.blocks:
        text = text.replace("¶", "").replace("\u00a0", " ").strip()
        if heading:
            text = text.rstrip("#").strip()  # node.js and mdBook anchor marks
        text = re.sub(r"\s+", " ", text)
        text = re.sub(r"^(\d+(\.\d+)*\.?|[A-Z]\.(\d+(\.\d+)*\.?)?)\s+(?=[A-Z])", "", text) if heading else text
        if not is_prose(text, heading):
            continue
        if paras and paras[-1] == text:  # a heading repeated in a title block
            continue
        paras.append(text)
    # trailing headings with no body belong to nothing
    while paras and len(_WORD.findall(paras[-1])) < 6:
        paras.pop()
    doc = "\n\n".join(paras)
    return doc if sum(len(_WORD.findall(x)) for x in paras) >= MIN_DOC_WORDS else ""


def download(deb_dir: Path) -> dict[str, Path]:
    """Returns {package: .deb path}, fetching pinned versions with apt-get download where missing."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    debs: dict[str, Path] = {}
    for s in SOURCES:
        found = sorted(deb_dir.glob(f"{s.package}_*.deb"))
        if not found:
            cmd = ["apt-get", "download", f"{s.package}={s.version}"]
            print("+", " ".join(cmd), flush=True)
            r = subprocess.run(cmd, cwd=deb_dir, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"apt-get download {s.package}={s.version} failed:\n{r.stderr}\n"
                         f"Run `apt-get update`, or fetch that exact version from snapshot.debian.org "
                         f"into --deb-dir {deb_dir}.")
            found = sorted(deb_dir.glob(f"{s.package}_*.deb"))
        debs[s.package] = found[-1]
    return debs


def deb_version(deb: Path) -> str:
    """Returns the Version field of a .deb."""
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def collect(debs: dict[str, Path], unpack_dir: Path) -> list[tuple[str, str]]:
    """Returns [(doc_id, text)] for every prose page of every source, in a fixed order."""
    docs: list[tuple[str, str]] = []
    for s in SOURCES:
        deb = debs[s.package]
        got = deb_version(deb)
        if got != s.version:
            print(f"WARNING: {s.package} is {got}, recipe pins {s.version}; the corpus will differ",
                  file=sys.stderr)
        out = unpack_dir / s.package
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
        root = out / s.html_root
        skips = [re.compile(x) for x in s.skip]
        include = re.compile(s.include)
        n0 = len(docs)
        for f in sorted(root.rglob("*.html")):
            rel = f.relative_to(root).as_posix()
            if not include.search(rel) or any(x.search(rel) for x in skips) or rel.startswith(("_", "search")):
                continue
            text = page_to_document(f.read_text(encoding="utf-8", errors="replace"))
            if text:
                docs.append((f"{s.package}:{rel}", text))
        print(f"{s.package} {got}: {len(docs) - n0} documents", flush=True)
    # Boilerplate: a full sentence repeated on many pages (site slogans, "this page is licensed ..."):
    # it would be memorized and would leak between splits; structural headings are short and stay.
    df: dict[str, int] = {}
    for _, text in docs:
        for para in set(text.split("\n\n")):
            df[para] = df.get(para, 0) + 1
    unique = []
    seen: set[str] = set()
    for doc_id, text in docs:
        paras = [x for x in text.split("\n\n") if df[x] <= BOILERPLATE_DOCS or len(_WORD.findall(x)) < 6]
        text = "\n\n".join(paras)
        h = hashlib.sha256(text.encode()).hexdigest()
        # exact-duplicate pages (same prose under two paths) would leak between splits
        if h not in seen and sum(len(_WORD.findall(x)) for x in paras) >= MIN_DOC_WORDS:
            seen.add(h)
            unique.append((doc_id, text))
    return unique


def split(docs: list[tuple[str, str]], seed: int, eval_bytes: int, calib_bytes: int,
          max_doc_bytes: int) -> dict[str, list[tuple[str, str]]]:
    """Returns {eval, calib, train} document lists: a seeded shuffle, filled eval then calib by size."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out: dict[str, list[tuple[str, str]]] = {"eval": [], "calib": [], "train": []}
    used = {"eval": 0, "calib": 0}
    for i in order:
        doc_id, text = docs[i]
        size = len(text.encode()) + len(DOC_SEP)
        for name, budget in (("eval", eval_bytes), ("calib", calib_bytes)):
            # held-out splits take medium pages only, so each is many documents from every source
            if size <= max_doc_bytes and used[name] + size <= budget:
                out[name].append(docs[i])
                used[name] += size
                break
        else:
            out["train"].append(docs[i])
    return out


def write_split(path: Path, docs: list[tuple[str, str]]) -> int:
    """Writes documents in the bundled format; returns bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for doc_id, t in docs:
        if DOC_SEP.strip() in t:
            sys.exit(f"{doc_id} contains the document separator {DOC_SEP.strip()!r}; the split would break")
    data = (DOC_SEP.join(t for _, t in docs) + "\n").encode()
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb-dir", type=Path, default=None, help="where .debs are (or will be downloaded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-bytes", type=int, default=900_000)
    ap.add_argument("--calib-bytes", type=int, default=900_000)
    ap.add_argument("--max-doc-bytes", type=int, default=40_000)
    ap.add_argument("--train-out", type=Path, default=REPO / ".corpus")
    ap.add_argument("--assets-out", type=Path, default=REPO / "actsparse" / "assets" / "text")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="actsparse_corpus_") as tmp:
        deb_dir = args.deb_dir or Path(tmp) / "debs"
        debs = download(deb_dir)
        docs = collect(debs, Path(tmp) / "unpacked")
        manifest_pkgs = {p: {"version": deb_version(d), "sha256": hashlib.sha256(d.read_bytes()).hexdigest()}
                         for p, d in debs.items()}
    parts = split(docs, args.seed, args.eval_bytes, args.calib_bytes, args.max_doc_bytes)
    sizes = {
        "train": write_split(args.train_out / "train.txt", parts["train"]),
        "calib": write_split(args.assets_out / "calib.txt", parts["calib"]),
        "eval": write_split(args.assets_out / "eval.txt", parts["eval"]),
    }
    manifest = {
        "seed": args.seed,
        "packages": manifest_pkgs,
        "separator": DOC_SEP,
        "splits": {k: {"documents": len(v), "bytes": sizes[k], "doc_ids": [d for d, _ in v]}
                   for k, v in parts.items()},
    }
    (args.train_out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for k in ("train", "calib", "eval"):
        by_src: dict[str, int] = {}
        for d, _ in parts[k]:
            by_src[d.split(":")[0]] = by_src.get(d.split(":")[0], 0) + 1
        print(f"{k:5s}: {len(parts[k]):5d} documents, {sizes[k]:>10,d} bytes  {by_src}")


if __name__ == "__main__":
    main()
