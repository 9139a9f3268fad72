"""Tokenize a JSON-lines corpus into Megatron's indexed format, and a corpus that ships with every Python.

``preprocess_jsonl`` does what Megatron-LM's ``tools/preprocess_data.py`` does without sentence splitting:
one JSON object a line, the text under ``json_key`` tokenized into one sequence per document, the
end-of-document token appended. ``python_stdlib_corpus`` writes the source files of Python's standard
library as such a corpus: megabytes of real text, with nothing to download.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from galvatron_fx.errors import ConfigError

from .indexed import IndexedDatasetWriter, best_dtype
from .tokenizers import load_tokenizer


@dataclass
class PreprocessStats:
    """What ``preprocess_jsonl`` wrote."""

    documents: int
    tokens: int
    bytes_read: int
    seconds: float
    dtype: str
    bin_path: Path
    idx_path: Path


def preprocess_jsonl(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer="byte",
    json_key: str = "text",
    append_eod: bool = True,
    progress_every: int = 10_000,
    log=None,
) -> PreprocessStats:
    """Tokenize ``input_path`` (JSON lines) into ``output_prefix.bin`` / ``.idx``, streaming.

    ``tokenizer`` is a tokenizer object or a spec for ``load_tokenizer``. Blank lines are skipped; a line that
    is not a JSON object with a string under ``json_key`` raises ``ConfigError`` naming the file and line, and
    leaves no output. Every ``progress_every`` documents a line with the rate goes to ``log`` (default: stderr).
    """
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    input_path = Path(input_path)
    if not input_path.is_file():
        raise ConfigError(f"{input_path} does not exist", "pass a JSON-lines file, one {'text': ...} object a line")
    dtype = best_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    bytes_read = 0
    with IndexedDatasetWriter(output_prefix, dtype) as writer, open(input_path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            bytes_read += len(line)
            if not line.strip():
                continue
            tokens = tokenizer.encode(_text(line, input_path, number, json_key))
            # an empty document gets no end-of-document token, as preprocess_data.py writes it
            if append_eod and tokens:
                tokens.append(tokenizer.eod)
            writer.add_document(tokens)
            if progress_every and writer.num_documents % progress_every == 0:
                elapsed = time.perf_counter() - start
                log(
                    f"processed {writer.num_documents} documents ({writer.num_documents / elapsed:.0f} documents/s, "
                    f"{bytes_read / elapsed / 2**20:.2f} MiB/s)"
                )
    return PreprocessStats(
        documents=writer.num_documents,
        tokens=writer.num_tokens,
        bytes_read=bytes_read,
        seconds=time.perf_counter() - start,
        dtype=dtype.name,
        bin_path=writer.bin_path,
        idx_path=writer.idx_path,
    )


def _text(line: bytes, path: Path, number: int, key: str) -> str:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where} is not valid JSON ({error})", "write one JSON object per line") from None
    if not isinstance(record, dict) or key not in record:
        raise ConfigError(f"{where} has no {key!r} field", f"give every line a {key!r} field, or pass its key")
    if not isinstance(record[key], str):
        raise ConfigError(f"{where}: {key!r} is a {type(record[key]).__name__}, not text", "store the text as a string")
    return record[key]


@dataclass
class CorpusStats:
    """What ``python_stdlib_corpus`` wrote."""

    files: int
    bytes: int
    path: Path
    stdlib: Path


def python_stdlib_corpus(
    out_jsonl: str | os.PathLike, max_files: int | None = None, max_bytes: int | None = None
) -> CorpusStats:
    """Write the ``*.py`` files of this Python's standard library to ``out_jsonl``, one ``{"text", "path"}``
    line each (``path`` relative to the library), in sorted path order, so the same Python writes the same file.

    Installed packages (``site-packages``, ``dist-packages``) are not the standard library and are left out, as
    are files that are not UTF-8 (a few test fixtures). ``max_files`` keeps the first files; ``max_bytes`` stops
    before the file that would take the text past that many bytes.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    files = total = 0
    try:
        with open(tmp, "w", encoding="utf-8") as sink:
            for path in _stdlib_sources(stdlib):
                if max_files is not None and files >= max_files:
                    break
                try:
                    text = path.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                size = len(text.encode("utf-8"))
                if max_bytes is not None and total + size > max_bytes:
                    break
                sink.write(json.dumps({"text": text, "path": path.relative_to(stdlib).as_posix()}) + "\n")
                files += 1
                total += size
        if not files:
            raise ConfigError(
                f"no standard-library source was written from {stdlib}",
                "raise max_files/max_bytes, or use a Python installation that ships its .py sources",
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return CorpusStats(files=files, bytes=total, path=out, stdlib=stdlib)


def _stdlib_sources(stdlib: Path) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = [name for name in subfolders if name not in skip]  # prune: never walk installed packages
        found.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(stdlib).as_posix())
