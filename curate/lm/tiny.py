"""Tiny real models for tests and as the skeleton of the proxy: LLaMA config + byte-level BPE tokenizer.

Why: tests must run real engines (transformers and vLLM) offline, so they build their own model: random
weights, a tokenizer trained with `tokenizers` on real text, a chat template, saved as safetensors in HF
format. head_dim is 64 because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

#: ChatML with BOS: the proxy's and the test models' chat template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_FALLBACK_TEXT = (
    "Give three tips for staying healthy. Eat a balanced diet and make sure to include plenty of fruits and "
    "vegetables. Exercise regularly to keep your body active and strong. Get enough sleep and maintain a "
    "consistent sleep schedule. What are the three primary colors? The three primary colors are red, blue, "
    "and yellow. Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. "
    "Natalia sold 48+24 = 72 clips altogether in April and May. #### 72 Write a short poem about the sea. "
    "The sea is wide, the sea is deep; it sings the sailors into sleep. Translate 'hello' into French: "
    "bonjour. Summarise the article in one sentence. Explain why the sky is blue: sunlight is scattered by "
    "the molecules of the air, and blue light is scattered more than red light because of its shorter "
    "wavelength. def add(a, b):\n    return a + b\n0123456789 !?.,;:'\"()[]{}<>-_+=*/\\|@#$%^&~`"
)

#: the bundled sample of a source checkout (absent from an installed wheel: then the built-in text is used)
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"


def sample_texts(limit: int = 400, source: str | Path | None = None) -> list[str]:
    """About `limit` texts of real instruction data to train a tokenizer on, the same on every machine.

    From `source` (a JSONL file or a folder of them) if given, else the repository's bundled sample
    (data/sample), split evenly across its files; the built-in text when neither exists.
    """
    path = Path(source) if source is not None else SAMPLE_DIR
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.exists() else []
    texts: list[str] = []
    for f in files:
        texts.extend(_jsonl_texts(f, max(1, limit // len(files))))
    return texts or [_FALLBACK_TEXT]


def _jsonl_texts(path: Path, limit: int) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= limit:
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield "\n".join(str(v) for v in row.values() if isinstance(v, str) and v)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer (never an unknown token) with our special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None,
        model_max_length=1 << 20,
    )
    fast.chat_template = chat_template
    return fast


def llama_config(tokenizer, *, hidden_size: int, head_dim: int, layers: int, intermediate_size: int | None,
                 max_positions: int, tie: bool):
    """A LLaMA config sized for CPU: heads = hidden/head_dim, one KV head per head (no GQA)."""
    from transformers import LlamaConfig

    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of head_dim {head_dim}")
    heads = hidden_size // head_dim
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )


def save_model(model, tokenizer, path: str | Path) -> str:
    """Save weights (safetensors), config, generation config and tokenizer in HF format."""
    from transformers import GenerationConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def make_tiny_model(
    path: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    head_dim: int = 64,
    layers: int = 2,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    max_positions: int = 2048,
) -> str:
    """Build a random-weight LLaMA + trained BPE tokenizer at `path` (loadable by transformers and vLLM)."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(list(texts) if texts is not None else sample_texts(), vocab_size)
    config = llama_config(tokenizer, hidden_size=hidden_size, head_dim=head_dim, layers=layers,
                          intermediate_size=None, max_positions=max_positions, tie=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default init so random logits are far from uniform (a sharper test)
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return save_model(model, tokenizer, path)
