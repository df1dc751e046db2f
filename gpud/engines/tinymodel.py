"""Make a tiny random-weight Llama that real vLLM can serve, for tests and `gpud demo`.

Run with the engine's interpreter, never imported by gpud (it needs torch):
    .venv-vllm/bin/python gpud/engines/tinymodel.py OUTDIR [--seed N]

No weights can be downloaded on the dev machines, so the model is made here: a 2-layer
Llama (hidden 256, 4 heads: the CPU attention kernels need head_dim >= 64), vocab 512,
bf16, and a byte-level BPE tokenizer trained on the text below. Its output is gibberish;
the serving path is real. Idempotent: an OUTDIR with a config.json is left alone. It is
written to a temporary sibling directory and renamed, so a half-made model is never seen.
`--kind classify` makes the same Llama as a one-label sequence classifier (a pooling
model: vLLM serves /pooling, /classify, /score and /rerank for it).
This script must never import gpud, nor reach the network.
"""

# mypy: ignore-errors
# (torch and transformers are not installed in gpud's virtualenv; this file is excluded from
#  mypy --strict in the lint run and only ever executed by the engine's interpreter)

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|unk|>",
    "<|end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
]

# A few KB of plain text, enough for the BPE trainer to fill a 512-token vocabulary.
CORPUS = """\
gpud is a Linux daemon that runs a handful of language models on the GPUs of one box.
The operator writes the desired state in a TOML file and gpud makes the box match it.
Which models are loaded, which sleep, which are awake at what time of day, how GPU memory
is shared between weights and the key value cache, and one endpoint in front of them all.
A model is unloaded, starting, awake, asleep, stopping or failed. Sleep offloads the
weights to host memory and discards the cache; waking brings them back in a fraction of
a second. The reconciler is the one loop that owns state. It plans, then it acts, then it
observes again. Applying the same plan twice changes nothing. An invalid file never
replaces the running one, and the error names the file, the line and the column.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Hello, how are you today? I am fine, thank you. What time is it? It is ten past nine.
Please summarize the following text in one sentence. Translate this into French.
Write a short poem about the sea. The sea is wide and grey and cold, the waves are old.
def main(argv: list[str]) -> int:
    for i in range(10):
        print(i, i * i, "squares")
    return 0
{"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
SELECT name, count(*) FROM models WHERE state = 'awake' GROUP BY name ORDER BY name;
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 32 64 128 256 512 1024 2048 4096
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April
May June July August September October November December morning noon evening night
The engine answered the health check. The engine crashed: out of memory. Restarting in
two seconds, then four, then eight, then sixteen, until it gives up and says why.
Users point their OpenAI clients at one URL and look at one status page.
"""


def make_tokenizer(outdir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(outdir))


def make_model(outdir: Path, seed: int, vocab_size: int, bos: int, eos: int, pad: int,
               kind: str = "generate", hidden: int = 256, layers: int = 2) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        # classify: one label, a cross-encoder's shape, so vLLM serves /score and /rerank too
        num_labels=1,
    )
    cls = LlamaForSequenceClassification if kind == "classify" else LlamaForCausalLM
    model = cls(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(str(outdir), safe_serialization=True)


def make(outdir: Path, seed: int, kind: str = "generate", hidden: int = 256,
         layers: int = 2) -> bool:
    """Make the model in OUTDIR; False when it was already there."""
    if (outdir / "config.json").exists():
        return False
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the engine may run as another user
    try:
        make_tokenizer(tmp)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp))
        make_model(tmp, seed, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                   kind, hidden, layers)
        if outdir.exists():  # a leftover without config.json: an interrupted older run
            shutil.rmtree(outdir)
        os.rename(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=("generate", "classify"), default="generate",
                        help="classify: a one-label sequence classifier (a pooling model)")
    # A bigger one for benches where prefill must cost something (bench/prefix_affinity.py).
    parser.add_argument("--hidden", type=int, default=256, help="a multiple of 64")
    parser.add_argument("--layers", type=int, default=2)
    ns = parser.parse_args(argv)
    made = make(ns.outdir, ns.seed, ns.kind, ns.hidden, ns.layers)
    print(f"{'made' if made else 'exists'}: {ns.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
