"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) that `transformers.CLIPTokenizer` reads.

Stable Diffusion's tokenizers (SD 1.x, SD 2.x, both SDXL tokenizers) all use OpenAI CLIP's 49408-token
byte-level BPE. The model hubs are out of reach, but the same BPE ranks ship inside PyPI packages, e.g.
open_clip_torch's `open_clip/bpe_simple_vocab_16e6.txt.gz`. This script turns that file into the two
files the studio ships in `studio/configs/clip_tokenizer/`, built exactly as OpenAI CLIP's
`simple_tokenizer.py` builds its encoder:

    vocab  = the 256 byte-unicode characters, the same with '</w>', every merge joined,
             then '<|startoftext|>', '<|endoftext|>'            (256 + 256 + 48894 + 2 = 49408)
    merges = lines 1..48894 of the BPE file (line 0 is a version header)

Usage (run once; the output is committed):

    pip download --no-deps open_clip_torch -d /tmp/oc
    python studio/configs/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl

The argument may be the wheel itself or the extracted `.txt.gz` file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP keeps the first 48894 merges of the file
VOCAB_SIZE = 49408
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
DEFAULT_OUT = Path(__file__).resolve().parent / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character table (same order as theirs)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def read_bpe_lines(source: Path) -> list[str]:
    """The BPE file's lines, read from the wheel or from the extracted .txt.gz."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(BPE_MEMBER)
    else:
        raw = source.read_bytes()
    return gzip.decompress(raw).decode("utf-8").split("\n")


def build_vocab_and_merges(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
    merges = bpe_lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"BPE file does not hold {NUM_MERGES} 'a b' merge lines after its header")
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_tokenizer_files(vocab: dict[str, int], merges: list[str], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Same shapes as the files in the official HF repos: compact JSON, merges with a version header.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), "utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="open_clip_torch wheel, or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    vocab, merges = build_vocab_and_merges(read_bpe_lines(args.source))
    write_tokenizer_files(vocab, merges, args.out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
