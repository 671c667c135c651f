"""The embedded model's CLIP tokenizer, built from the toy world's vocabulary.

The files follow the conventions of OpenAI's CLIP tokenizer exactly, so
`transformers.CLIPTokenizer.from_pretrained(folder)` loads them as it would a
real Stable Diffusion tokenizer:

* byte-level BPE, lowercase, end-of-word suffix ``</w>``;
* ``vocab.json`` starts with the 256 byte symbols, then the 256 byte symbols
  with ``</w>``, then one entry per merge (in merge order), then
  ``<|startoftext|>`` and ``<|endoftext|>`` (also the padding token);
* ``merges.txt`` starts with a ``#version: 0.2`` line.

The merges are learned with the `tokenizers` BPE trainer on the world's
vocabulary until every world word is a single token; any other word still
tokenizes, into smaller pieces down to single characters.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 32  # tokens including BOS/EOS; the text encoder's max_position_embeddings matches
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE."""
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel.alphabet() is a set; order it the way CLIP's bytes_to_unicode does.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    assert set(symbols) == set(ByteLevel.alphabet())
    return symbols


def _pieces(words: list[str]) -> list[str]:
    """Split words as the CLIP pre-tokenizer does (letters runs, digits, punctuation)."""
    import re

    out: list[str] = []
    for word in words:
        for piece in re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", word.lower()):
            if piece not in out:
                out.append(piece)
    return out


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) in CLIP layout for a list of words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    symbols = _byte_symbols()
    pieces = _pieces(words)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: merging stops when every word is one token
        min_frequency=0,
        show_progress=False,
        initial_alphabet=symbols,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
    )
    tok.train_from_iterator([" ".join(pieces)], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]

    vocab_list = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab_list)
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in seen:
            vocab_list.append(token)
            seen.add(token)
    vocab_list += [BOS, EOS]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def write_tokenizer(folder: str | Path, words: list[str] | None = None, max_length: int = MAX_LENGTH) -> Path:
    """Write the tokenizer files for `words` (default: the world's vocabulary) into `folder`."""
    if words is None:
        from studio.demo import world

        words = list(world.vocabulary())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": {"content": BOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": EOS,
        "unk_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def _normalise(text: str) -> str:
    """Lower case, single spaces, no space before punctuation (CLIP decoding puts one there)."""
    import re

    return re.sub(r"\s+([,.!?;:])", r"\1", " ".join(text.lower().split()))


def check_tokenizer(tokenizer, words: list[str], captions: list[str] = ()) -> None:
    """Raise if a world word is not one token or a caption does not round-trip."""
    for word in _pieces(words):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AssertionError(f"world word {word!r} is {len(ids)} tokens: {tokenizer.convert_ids_to_tokens(ids)}")
    for caption in captions:
        ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
        if len(ids) >= tokenizer.model_max_length:
            raise AssertionError(f"caption {caption!r} needs {len(ids)} tokens (limit {tokenizer.model_max_length})")
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if _normalise(text) != _normalise(caption):
            raise AssertionError(f"caption {caption!r} decodes as {text!r}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write the embedded model's CLIP tokenizer files.")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    folder = write_tokenizer(args.folder)
    tok = load_tokenizer(folder)
    from studio.demo import world

    check_tokenizer(tok, world.vocabulary(), [s.caption for s in world.eval_scenes(50)])
    print(f"wrote {folder} ({len(tok)} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
