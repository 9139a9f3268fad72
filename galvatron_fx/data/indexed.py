"""Megatron-LM's memory-mapped indexed dataset: ``PREFIX.bin`` (the tokens) and ``PREFIX.idx`` (the index).

This is the format Megatron-LM's ``tools/preprocess_data.py`` writes and Megatron and Galvatron train from, so
a corpus tokenized once serves all three. The ``.idx`` file, little-endian:

====================  ==========================================================================
``9 bytes``           magic ``b"MMIDIDX\\x00\\x00"``
``<Q``                version, 1
``<B``                dtype code of the tokens (see ``DTYPE_CODES``)
``<Q``                sequence count ``S``
``<Q``                document count ``D`` (the length of the document index array, documents + 1)
``int32[S]``          sequence lengths, in tokens
``int64[S]``          sequence pointers: byte offset of each sequence in ``.bin``
``int64[D]``          document indices: the sequence at which each document starts, ``0`` first and ``S`` last
``int8[S]``           (multimodal datasets only) sequence modes; accepted and ignored
====================  ==========================================================================

``.bin`` holds the tokens of every sequence, concatenated, in that dtype. Both files are memory-mapped, so
opening a dataset of any size costs only its index, and reading a sequence reads only its pages.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from galvatron_fx.errors import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's DType enum: the code stored in the header → the token dtype
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype.name: code for code, dtype in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count: 34 bytes


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron chooses for a vocabulary: uint16 below 65500 tokens, else int32."""
    # 65500, not 65536: Megatron's threshold (DType.optimal_dtype), kept so that both write the same files
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """``(PREFIX.bin, PREFIX.idx)``."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _corrupt(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{path} is not a valid Megatron indexed-dataset index: {what}",
        "regenerate it with `galvatron-fx preprocess-data` (or Megatron-LM's tools/preprocess_data.py)",
    )


class IndexedDataset:
    """The sequences of ``PREFIX.bin`` / ``PREFIX.idx``, memory-mapped and read-only.

    ``len(ds)`` is the number of sequences, ``ds[i]`` the tokens of sequence ``i`` (a read-only numpy view of
    the map). A truncated, foreign or inconsistent index raises ``ConfigError`` naming the file.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise ConfigError(
                    f"{path} does not exist",
                    "pass the prefix without .bin/.idx, of files written by `galvatron-fx preprocess-data`",
                )
        self._open()

    def _open(self) -> None:
        idx = self.idx_path
        size = idx.stat().st_size
        if size < _HEADER.size:
            raise _corrupt(idx, f"{size} bytes, shorter than the {_HEADER.size}-byte header (truncated?)")
        index = np.memmap(idx, dtype=np.uint8, mode="r")
        magic, version, code, count, doc_count = _HEADER.unpack_from(index, 0)
        if magic != MAGIC:
            raise _corrupt(idx, f"magic {magic!r}, not {MAGIC!r} (not an MMIDIDX file)")
        if version != VERSION:
            raise _corrupt(idx, f"version {version}, this reader knows version {VERSION}")
        if code not in DTYPE_CODES:
            raise _corrupt(idx, f"dtype code {code} is unknown (known: {sorted(DTYPE_CODES)})")
        # the arrays must fill the file exactly; a multimodal index adds one int8 mode per sequence
        arrays = 12 * count + 8 * doc_count
        if size not in (_HEADER.size + arrays, _HEADER.size + arrays + count):
            raise _corrupt(
                idx,
                f"{size} bytes, but a header of {count} sequences and {doc_count} document indices needs "
                f"{_HEADER.size + arrays} (truncated, or written by something else?)",
            )
        self.dtype = DTYPE_CODES[code].newbyteorder("<")
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(index, dtype="<i4", count=count, offset=offset)
        offset += 4 * count
        self.sequence_pointers = np.frombuffer(index, dtype="<i8", count=count, offset=offset)
        offset += 8 * count
        self.document_indices = np.frombuffer(index, dtype="<i8", count=doc_count, offset=offset)
        self._check(count)
        bin_size = self.bin_path.stat().st_size
        # np.memmap refuses an empty file; a dataset of empty documents has no tokens to map
        self._bin = np.memmap(self.bin_path, dtype=np.uint8, mode="r") if bin_size else np.zeros(0, np.uint8)
        if count:
            ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * self.dtype.itemsize
            last = int(ends.max())
            if last > bin_size:
                raise _corrupt(
                    idx,
                    f"sequence {int(ends.argmax())} ends at byte {last}, beyond the {bin_size} bytes of "
                    f"{self.bin_path} (the .bin belongs to another index, or is truncated)",
                )
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))

    def _check(self, count: int) -> None:
        idx, docs = self.idx_path, self.document_indices
        if count and (self.sequence_lengths.min() < 0 or self.sequence_pointers.min() < 0):
            raise _corrupt(idx, "a sequence length or pointer is negative")
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != count:
            first, last = (int(docs[0]), int(docs[-1])) if len(docs) else (None, None)
            raise _corrupt(idx, f"document indices run {first}..{last}, not 0..{count} (the sequence count)")
        if len(docs) > 1 and (np.diff(docs) < 0).any():
            raise _corrupt(idx, "document indices decrease")

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end when ``length`` is None)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        size = int(self.sequence_lengths[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of {size} tokens")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return self._bin[start : start + length * self.dtype.itemsize].view(self.dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def document(self, d: int) -> np.ndarray:
        """All the tokens of document ``d`` (its sequences, concatenated)."""
        first, last = int(self.document_indices[d]), int(self.document_indices[d + 1])
        parts = [self.get(i) for i in range(first, last)]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    # Pickling a memmap copies the whole array; a DataLoader worker started by spawn gets the prefix instead
    # and maps the files itself.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_documents} documents, "
            f"{self.num_tokens} tokens of {self.dtype.name})"
        )


class IndexedDatasetWriter:
    """Writes ``PREFIX.bin`` / ``PREFIX.idx`` one document at a time.

    Each document is one sequence, as ``preprocess_data.py`` writes without sentence splitting; an empty
    document is recorded with no sequence, as Megatron records it. The files appear only at ``finalize()``,
    renamed from temporary files, so a reader never sees half a dataset. Used as a context manager, it
    finalizes on success and deletes the temporary files on an exception.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in _CODE_OF:
            raise ConfigError(f"dtype {self.dtype} has no Megatron dtype code", f"use one of {sorted(_CODE_OF)}")
        self.dtype = self.dtype.newbyteorder("<")  # Megatron's files are little-endian, whatever the host
        self.bin_path, self.idx_path = paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + suffix)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + suffix)
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self._documents: list[int] = [0]
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self.num_tokens = 0

    def add_document(self, tokens) -> None:
        """Append one document (a sequence of token ids) as one sequence."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ConfigError(f"a document must be a 1-D sequence of tokens, got shape {array.shape}", "flatten it")
        if array.size:
            if self._info is not None and (array.min() < self._info.min or array.max() > self._info.max):
                raise ConfigError(
                    f"token ids {int(array.min())}..{int(array.max())} do not fit {self.dtype.name}",
                    "choose the dtype with best_dtype(vocab_size) of the tokenizer that made them",
                )
            self._bin.write(array.astype(self.dtype, copy=False).tobytes())
            self._lengths.append(int(array.size))
            self.num_tokens += int(array.size)
        self._documents.append(len(self._lengths))

    @property
    def num_documents(self) -> int:
        return len(self._documents) - 1

    def finalize(self) -> tuple[Path, Path]:
        """Write the index and move both files into place; returns ``(bin_path, idx_path)``."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype="<i4")
        pointers = np.zeros(len(lengths), dtype="<i8")
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as out:
            code = _CODE_OF[self.dtype.name]
            out.write(_HEADER.pack(MAGIC, VERSION, code, len(lengths), len(self._documents)))
            out.write(lengths.tobytes())
            out.write(pointers.tobytes())
            out.write(np.asarray(self._documents, dtype="<i8").tobytes())
            out.flush()
            os.fsync(out.fileno())
        # .bin first: an .idx in place always describes the .bin beside it once both renames are done
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        return self.bin_path, self.idx_path

    def abort(self) -> None:
        """Drop what was written; no file is left behind."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            path.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
