"""Tokenize a JSON-lines corpus (one {"text": ...} object a line) into Megatron-LM's memory-mapped indexed
format, PREFIX.bin + PREFIX.idx, the files Megatron's tools/preprocess_data.py writes: one sequence per
document, each ending in the tokenizer's end-of-document token. --stdlib writes and tokenizes the source
files of this Python's standard library instead, real text with nothing to download."""

from __future__ import annotations

import argparse
from pathlib import Path

from galvatron_fx.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE.jsonl", help="JSON-lines corpus to tokenize")
    source.add_argument(
        "--stdlib", action="store_true", help="write PREFIX.jsonl from Python's standard library and tokenize it"
    )
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument(
        "--tokenizer", default="byte", metavar="byte|NAME_OR_PATH", help="'byte' (UTF-8 bytes) or a Hugging Face one"
    )
    parser.add_argument("--json-key", default="text", help="the field of each line that holds the text")
    parser.add_argument("--max-files", type=int, default=None, metavar="N", help="--stdlib: the first N files only")
    parser.add_argument("--no-eod", action="store_true", help="do not end each document with the EOD token")
    parser.add_argument("--progress-every", type=int, default=10_000, metavar="N", help="report every N documents")


def run(args: argparse.Namespace) -> int:
    from galvatron_fx.data import load_tokenizer, preprocess_jsonl, python_stdlib_corpus

    if args.max_files is not None and not args.stdlib:
        raise ConfigError("--max-files applies to --stdlib only", "drop it, or cut the input file yourself")
    if args.max_files is not None and args.max_files < 1:
        raise ConfigError(f"--max-files {args.max_files} is not positive", "pass at least 1")
    tokenizer = load_tokenizer(args.tokenizer)  # before any writing: a bad name fails fast
    written = []
    source = Path(args.input) if args.input else None
    if args.stdlib:
        corpus = python_stdlib_corpus(args.output_prefix + ".jsonl", max_files=args.max_files)
        print(f"{corpus.files} standard-library files ({corpus.bytes / 2**20:.1f} MiB) from {corpus.stdlib}")
        source = corpus.path
        written.append(corpus.path)
    stats = preprocess_jsonl(
        source,
        args.output_prefix,
        tokenizer,
        json_key=args.json_key,
        append_eod=not args.no_eod,
        progress_every=args.progress_every,
    )
    written += [stats.bin_path, stats.idx_path]
    print(
        f"{stats.documents} documents, {stats.tokens} tokens ({stats.dtype}) in {stats.seconds:.1f} s "
        f"with tokenizer {args.tokenizer}"
    )
    for path in written:
        print(f"  wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    print(f"next: galvatron-fx train gpt2 --data {args.output_prefix} ...")
    return 0
