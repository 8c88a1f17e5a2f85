"""Text data: bundled splits, local files and Hugging Face datasets, as documents and token windows."""
from .text import DOC_SEPARATOR, TextData, text_data, token_stream, token_windows

__all__ = ["text_data", "TextData", "token_stream", "token_windows", "DOC_SEPARATOR"]
