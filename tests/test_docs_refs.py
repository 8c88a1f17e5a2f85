"""The docs and the code's docstrings and comments name only files and make targets that exist.

A repository path is a token that starts at a top-level folder (`actsparse/eval/speed.py`,
`conf/claim/`, `sweeps/demo.yaml`); a relative markdown link resolves from the page it is on.
Not checked: URLs and other repositories' paths (the token follows `/`, `.` or a word character),
globs and placeholders (`*`, `<name>`, `{i}`), and outputs a run creates.
"""
import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("actsparse", "benchmarks", "conf", "docs", "kernels", "scripts", "sweeps", "tests")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP)})/[\w./{{}}<>*-]*)")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
MAKE = re.compile(r"`make ([\w-]+)[^`]*`|^\s*\$?\s*make ([\w-]+)", re.M)
TARGET = re.compile(r"^([\w.-]+(?:[ \t]+[\w.-]+)*)[ \t]*:(?!=)", re.M)
# paths that are not in a source tree on purpose: {path: why it is named}
ELSEWHERE = {
    "actsparse/kernels/": "where a wheel installs kernels/ (pyproject's package-dir), named by the import docs",
}

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "scripts" / "README.md",
         ROOT / "benchmarks" / "BENCHMARKS.md"]
SOURCES = [p for d in ("actsparse", "benchmarks", "scripts", "kernels") for p in sorted((ROOT / d).rglob("*.py"))]


def prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of a Python file's docstrings and comments."""
    src = path.read_text()
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
           if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].value.value))
    return out


def texts():
    """(file, line, text) of everything scanned."""
    for page in PAGES:
        for i, line in enumerate(page.read_text().splitlines(), 1):
            yield page, i, line
    for src in SOURCES:
        for i, text in prose(src):
            yield src, i, text


def missing_paths() -> list[str]:
    bad = []
    for f, line, text in texts():
        for ref in PATH.findall(text):
            ref = ref.rstrip(".")
            if any(c in ref for c in "*<>{}") or ref in ELSEWHERE:
                continue
            if "." not in Path(ref).name and not ref.endswith("/") and not (ROOT / ref).parent.exists():
                continue  # a folder's parent exists; without it this is a list of words (`sweeps/models/methods`)
            if not (ROOT / ref).exists():
                bad.append(f"{f.relative_to(ROOT)}:{line}: {ref}")
        if f.suffix == ".md":
            for link in LINK.findall(text):
                if "://" not in link and not link.startswith("mailto:") and not (f.parent / link).exists():
                    bad.append(f"{f.relative_to(ROOT)}:{line}: link {link}")
    return bad


def test_every_repository_path_named_in_docs_and_comments_exists():
    bad = missing_paths()
    assert not bad, "named but not in the repository:\n" + "\n".join(bad)


def test_every_make_target_named_in_docs_is_in_the_makefile():
    targets = {t for m in TARGET.findall((ROOT / "Makefile").read_text()) for t in m.split()}
    bad = [f"{p.relative_to(ROOT)}: make {a or b}" for p in PAGES for a, b in MAKE.findall(p.read_text())
           if (a or b) not in targets]
    assert not bad, "no such make target:\n" + "\n".join(bad)


def test_the_scanner_finds_a_missing_path_and_skips_urls_globs_and_placeholders():
    found = lambda s: [r for r in PATH.findall(s) if not any(c in r for c in "*<>{}")]  # noqa: E731
    assert found("see `docs/nope.md` and conf/claim/x.yaml.") == ["docs/nope.md", "conf/claim/x.yaml."]
    assert found("https://github.com/a/b/docs/x.md ../shared/docs/y.md conf/model/<name>.yaml "
                 "sweeps/*.yaml layers.{i}.mlp actsparse/{a}.py") == []
    assert MAKE.findall("run `make test-fast PYTEST_ARGS=-k x`") == [("test-fast", "")]
