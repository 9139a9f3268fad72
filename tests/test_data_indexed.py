"""galvatron_fx.data: Megatron's indexed format (checked against the spec, byte for byte), its error messages,
tokenizers, JSON-lines preprocessing and the preprocess-data command."""

import json
import struct

import numpy as np
import pytest

from galvatron_fx.cli import main
from galvatron_fx.data import (
    ByteTokenizer,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    load_tokenizer,
    preprocess_jsonl,
    python_stdlib_corpus,
)
from galvatron_fx.errors import ConfigError


def _documents(vocab, count=7, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 40)) for _ in range(count)]


def _write(prefix, documents, dtype):
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
    return IndexedDataset(prefix)


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65000), (np.int32, 200_000)])
def test_round_trip(tmp_path, dtype, vocab):
    documents = _documents(vocab)
    dataset = _write(tmp_path / "d", documents, dtype)
    assert dataset.dtype == np.dtype(dtype)
    assert len(dataset) == len(documents) == dataset.num_documents
    assert dataset.num_tokens == sum(len(d) for d in documents)
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[i], document)
        np.testing.assert_array_equal(dataset.document(i), document)
    np.testing.assert_array_equal(dataset.get(2, 1, 3), documents[2][1:4])
    assert list(dataset.document_indices) == list(range(len(documents) + 1))
    assert not list(tmp_path.glob("*.tmp*")), "temporary files are renamed away"


def test_best_dtype_follows_megatron():
    assert best_dtype(256) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128_256) == np.int32


def test_idx_bytes_match_the_spec(tmp_path):
    """Re-encode Megatron's layout independently with struct and compare the whole file."""
    documents = [[5, 6, 7], [], [1, 2], [300]]
    _write(tmp_path / "s", documents, np.uint16)
    lengths = [3, 2, 1]  # the empty document has no sequence
    pointers = [0, 6, 10]  # byte offsets: 2 bytes per uint16 token
    doc_indices = [0, 1, 1, 2, 3]
    expected = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
    expected += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_indices))
    expected += struct.pack(f"<{len(lengths)}i", *lengths)
    expected += struct.pack(f"<{len(pointers)}q", *pointers)
    expected += struct.pack(f"<{len(doc_indices)}q", *doc_indices)
    assert (tmp_path / "s.idx").read_bytes() == expected
    assert (tmp_path / "s.bin").read_bytes() == struct.pack("<6H", 5, 6, 7, 1, 2, 300)
    dataset = IndexedDataset(tmp_path / "s")
    assert dataset.num_documents == 4 and len(dataset.document(1)) == 0


def test_int32_header_code(tmp_path):
    _write(tmp_path / "i", [[70000, 1]], np.int32)
    raw = (tmp_path / "i.idx").read_bytes()
    assert raw[17] == 4  # dtype code after 9 magic bytes and the 8-byte version
    assert (tmp_path / "i.bin").read_bytes() == struct.pack("<2i", 70000, 1)


def _corrupt(tmp_path, edit):
    _write(tmp_path / "c", _documents(1000), np.uint16)
    idx = tmp_path / "c.idx"
    raw = bytearray(idx.read_bytes())
    idx.write_bytes(bytes(edit(raw)))
    with pytest.raises(ConfigError) as error:
        IndexedDataset(tmp_path / "c")
    assert str(idx) in str(error.value)
    assert error.value.remedy
    return str(error.value)


def test_truncated_idx(tmp_path):
    assert "truncated" in _corrupt(tmp_path, lambda raw: raw[:-5])
    assert "header" in _corrupt(tmp_path, lambda raw: raw[:20])


def test_foreign_magic(tmp_path):
    assert "magic" in _corrupt(tmp_path, lambda raw: b"NOTMMAP\x00\x00" + raw[9:])


def test_unknown_version_and_dtype(tmp_path):
    assert "version" in _corrupt(tmp_path, lambda raw: raw[:9] + struct.pack("<Q", 2) + raw[17:])
    assert "dtype code 9" in _corrupt(tmp_path, lambda raw: raw[:17] + b"\x09" + raw[18:])


def test_pointers_beyond_bin(tmp_path):
    def far_pointer(raw):
        count = struct.unpack_from("<Q", raw, 18)[0]
        struct.pack_into("<q", raw, 34 + 4 * count + 8 * (count - 1), 10**9)  # the last sequence's pointer
        return raw

    message = _corrupt(tmp_path, far_pointer)
    assert "beyond" in message and "c.bin" in message


def test_bad_document_indices(tmp_path):
    def last_index(raw):
        struct.pack_into("<q", raw, len(raw) - 8, 99)
        return raw

    assert "document indices" in _corrupt(tmp_path, last_index)


def test_missing_files_and_bad_tokens(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        IndexedDataset(tmp_path / "nothing")
    writer = IndexedDatasetWriter(tmp_path / "w", np.uint16)
    with pytest.raises(ConfigError, match="do not fit uint16"):
        writer.add_document([1, 70000])
    writer.abort()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="no Megatron dtype code"):
        IndexedDatasetWriter(tmp_path / "w", np.uint32)


def test_pickle_reopens_instead_of_copying(tmp_path):
    import pickle

    dataset = _write(tmp_path / "p", _documents(500), np.uint16)
    blob = pickle.dumps(dataset)
    assert len(blob) < 200
    np.testing.assert_array_equal(pickle.loads(blob)[3], dataset[3])


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_preprocess_jsonl_byte(tmp_path):
    texts = ["hello world", "", "émigré ✓ 数据", "line\nbreaks\n"]
    source = _jsonl(tmp_path / "in.jsonl", texts)
    lines = []
    stats = preprocess_jsonl(source, tmp_path / "out", "byte", progress_every=2, log=lines.append)
    dataset = IndexedDataset(tmp_path / "out")
    assert stats.documents == 4 and dataset.num_documents == 4
    assert stats.tokens == dataset.num_tokens == sum(len(t.encode()) + 1 for t in texts if t)
    assert len(lines) == 2 and "documents/s" in lines[0]
    tokenizer = ByteTokenizer()
    for d, text in enumerate(texts):
        tokens = dataset.document(d)
        if text:
            assert tokens[-1] == tokenizer.eod
            assert bytes(tokens[:-1].tolist()) == text.encode("utf-8")
            assert tokenizer.decode(tokens[:-1]) == text
        else:
            assert len(tokens) == 0


def test_preprocess_malformed_line(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        preprocess_jsonl(source, tmp_path / "out", "byte")
    assert "bad.jsonl, line 3" in str(error.value)
    assert not list(tmp_path.glob("out*")), "nothing is left behind"
    source.write_text('{"body": "no text key"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1 has no 'text' field"):
        preprocess_jsonl(source, tmp_path / "out", "byte")
    stats = preprocess_jsonl(source, tmp_path / "out", "byte", json_key="body")
    assert stats.documents == 1


def test_stdlib_corpus(tmp_path):
    corpus = python_stdlib_corpus(tmp_path / "py.jsonl", max_files=5)
    records = [json.loads(line) for line in corpus.path.read_text(encoding="utf-8").splitlines()]
    assert corpus.files == len(records) == 5
    paths = [r["path"] for r in records]
    assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    assert records[0]["text"] == (corpus.stdlib / paths[0]).read_text(encoding="utf-8")
    again = python_stdlib_corpus(tmp_path / "again.jsonl", max_files=5)
    assert again.path.read_bytes() == corpus.path.read_bytes(), "deterministic"
    small = python_stdlib_corpus(tmp_path / "small.jsonl", max_bytes=corpus.bytes)
    assert small.bytes <= corpus.bytes and small.files <= 5

    stats = preprocess_jsonl(corpus.path, tmp_path / "py", "byte")
    dataset = IndexedDataset(tmp_path / "py")
    assert stats.documents == 5
    for d, record in enumerate(records):
        assert bytes(dataset.document(d)[:-1].tolist()) == record["text"].encode("utf-8")


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError) as error:
        load_tokenizer(str(tmp_path / "no" / "such" / "tokenizer"))
    assert "could not be loaded" in str(error.value) and error.value.remedy


def test_hf_tokenizer_from_local_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<eos>", "<unk>", "hello", "world"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer.vocab_size == 4 and tokenizer.eod == 0
    assert tokenizer.encode("hello world hello") == [2, 3, 2]
    stats = preprocess_jsonl(_jsonl(tmp_path / "in.jsonl", ["hello world"]), tmp_path / "hf", tokenizer)
    assert IndexedDataset(tmp_path / "hf")[0].tolist() == [2, 3, 0] and stats.dtype == "uint16"


def test_cli_preprocess_data_stdlib(tmp_path, capsys):
    prefix = tmp_path / "py"
    assert main(["preprocess-data", "--stdlib", "--max-files", "3", "--output-prefix", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and f"--data {prefix}" in out and "py.idx" in out
    dataset = IndexedDataset(prefix)
    assert dataset.num_documents == 3 and dataset.num_tokens > 0 and dataset.dtype == np.uint16


def test_cli_errors_are_one_line(tmp_path, capsys):
    source = _jsonl(tmp_path / "in.jsonl", ["x"])
    args = ["preprocess-data", "--input", str(source), "--output-prefix", str(tmp_path / "o"), "--max-files", "2"]
    assert main(args) == 2
    assert "--max-files applies to --stdlib only" in capsys.readouterr().err
    assert main(["preprocess-data", "--input", str(source), "--output-prefix", str(tmp_path / "o")]) == 0
