"""Resolve a data spec to documents, and documents to token windows."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ActsparseError

TEXT_DIR = Path(__file__).resolve().parent.parent / "assets" / "text"
BUNDLED_SPLITS = ("calib", "eval")
DOC_SEPARATOR = "<|doc|>"  # a line holding only this separates documents in bundled and local files


@dataclass(frozen=True)
class TextData:
    """A named list of documents; `key` is a content hash used in artifact keys."""
    name: str
    documents: tuple[str, ...]

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(d.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)

    def __repr__(self) -> str:
        return f"TextData({self.name!r}, {len(self.documents)} documents, {self.n_chars} chars)"


def split_documents(text: str) -> list[str]:
    """Split a file's text into documents on separator lines (or blank-line paragraphs if none)."""
    if DOC_SEPARATOR in text:
        parts = [p.strip() for p in text.split(DOC_SEPARATOR)]
    else:
        parts = [text.strip()]
    return [p for p in parts if p]


def text_data(spec: "str | TextData") -> TextData:
    """Return the documents of `bundled:<split>`, a local text file, or `hf:<dataset>[:<config>]:<split>`."""
    if isinstance(spec, TextData):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ActsparseError(f"data must be a non-empty string spec, got {spec!r}")
    if spec.startswith("bundled:"):
        split = spec.split(":", 1)[1]
        if split not in BUNDLED_SPLITS:
            raise ActsparseError(f"unknown bundled split {split!r}; expected one of "
                                 f"{', '.join('bundled:' + s for s in BUNDLED_SPLITS)}")
        path = TEXT_DIR / f"{split}.txt"
        if not path.exists():
            raise ActsparseError(f"bundled text {path} is missing; rebuild it with scripts/build_corpus.py")
        return TextData(spec, tuple(split_documents(path.read_text(encoding="utf-8"))))
    if spec.startswith("hf:"):
        return _hf_dataset(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ActsparseError(f"data {spec!r} is not a file; expected bundled:<{'|'.join(BUNDLED_SPLITS)}>, "
                             "a local text file, or hf:<dataset>[:<config>]:<split>")
    docs = split_documents(path.read_text(encoding="utf-8"))
    if not docs:
        raise ActsparseError(f"data file {spec!r} is empty")
    return TextData(str(path), tuple(docs))


def _hf_dataset(spec: str) -> TextData:
    parts = spec.split(":")[1:]
    if len(parts) not in (2, 3) or not all(parts):
        raise ActsparseError(f"bad dataset spec {spec!r}; expected hf:<dataset>[:<config>]:<split>, "
                             "e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    from ..models.load import hub_offline

    if hub_offline():
        raise ActsparseError(f"cannot load dataset {spec!r}: the Hugging Face hub cannot be reached (offline); "
                             "use bundled:calib / bundled:eval or a local text file")
    try:
        import datasets  # optional: only online users need it
    except ImportError as e:
        raise ActsparseError(f"{spec!r} needs the `datasets` package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        why = "the Hugging Face hub cannot be reached (offline)" if hub_offline() else str(e)
        raise ActsparseError(f"cannot load dataset {spec!r}: {why}; offline, use bundled:calib / "
                             "bundled:eval or a local text file") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if name == "wikitext":  # wikitext stores one line per row: rejoin, it is one long document stream
        texts = ["".join(ds[column])]
    return TextData(spec, tuple(texts))


def token_stream(tok, data: TextData, max_tokens: int | None = None) -> torch.Tensor:
    """Return the documents tokenized and joined with EOS between them, as a 1-D int64 tensor."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids: list[int] = []
    for doc in data.documents:
        ids.extend(tok(doc, add_special_tokens=False, verbose=False)["input_ids"])  # long docs are windowed later
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(stream: torch.Tensor, seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream into disjoint full windows [n, seq_len] (the last partial window is dropped)."""
    if seq_len < 2:
        raise ActsparseError(f"seq_len must be >= 2, got {seq_len}")
    n = stream.numel() // seq_len
    if n == 0:
        raise ActsparseError(f"need at least {seq_len} tokens for one window, the data has {stream.numel()}")
    if n_windows is not None:
        n = min(n, n_windows)
    return stream[: n * seq_len].view(n, seq_len)
