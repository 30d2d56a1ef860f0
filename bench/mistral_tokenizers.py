"""Write the real tokenizers the vocabulary-map benchmark uses, as tokenizer.json directories, from the files that
ship inside mistral-common's wheel (no hub access).

    python3 -m venv /tmp/tokconv && /tmp/tokconv/bin/pip install mistral-common==1.13.1 sentencepiece \\
        protobuf transformers==5.24.0
    /tmp/tokconv/bin/python bench/mistral_tokenizers.py /tmp/ivl-tokenizers

writes /tmp/ivl-tokenizers/tekken_240911 (131072 byte-level BPE tokens, the Llama-3-sized side) and
/tmp/ivl-tokenizers/tokenizer_v1 (32000 SentencePiece tokens, the Llama-2-sized side) and
/tmp/ivl-tokenizers/tokenizer_v3 (Mistral's v3 SentencePiece model, 32768 tokens). The conversion needs
mistral-common, sentencepiece and protobuf; loading the result needs none of them, so they stay out of the project's
environment.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def main(out: Path) -> None:
    import mistral_common
    from transformers import LlamaTokenizer
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    data = Path(mistral_common.__file__).parent / "data"
    tekken = convert_tekken_tokenizer(str(data / "tekken_240911.json"))
    tekken.save_pretrained(str(out / "tekken_240911"))
    with tempfile.TemporaryDirectory() as src:  # transformers reads a SentencePiece model as <dir>/tokenizer.model
        shutil.copyfile(data / "tokenizer.model.v1", Path(src) / "tokenizer.model")
        v1 = LlamaTokenizer.from_pretrained(src, legacy=True)
    v1.save_pretrained(str(out / "tokenizer_v1"))
    with tempfile.TemporaryDirectory() as src:
        shutil.copyfile(data / "mistral_instruct_tokenizer_240323.model.v3", Path(src) / "tokenizer.model")
        v3 = LlamaTokenizer.from_pretrained(src, legacy=True)
    v3.save_pretrained(str(out / "tokenizer_v3"))
    print(
        f"{out / 'tekken_240911'}: {len(tekken)} tokens; {out / 'tokenizer_v1'}: {len(v1)} tokens; "
        f"{out / 'tokenizer_v3'}: {len(v3)} tokens"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: mistral_tokenizers.py OUT_DIR")
    main(Path(sys.argv[1]))
