"""One-shot GPU check for a lent GPU machine: curate's HF engine on a model of SmolLM2-135M's shape, and the
embedding stage, in tokens/s and rows/s.

    python3 bench/gpu_oneshot.py [--rows 3675] [--out $OUT/gpu_oneshot.md]      # on the GPU machine
    .venv/bin/python bench/gpu_oneshot.py --tiny --rows 24                      # smoke test on a CPU

Why random weights: the GPU machine has no network and only 64 MiB of the working tree travel, so neither the
packaged GGUF nor the converted model can go there. Speed depends on the shape, not the values: the LM is a
LlamaForCausalLM with SmolLM2-135M-Instruct's config (30 layers, d 576, 9 heads / 3 KV heads, MLP 1536, vocab
49152, tied embeddings), the embedder a BertModel of all-MiniLM-L6-v2's shape (6 layers, d 384), both with
tokenizers trained here on the bundled sample (data/sample, which travels with the tree), so token counts
differ a little from the real tokenizers'; rates are per real (unpadded) token.

What runs:
- LM: both IFD passes (conditioned: chat-rendered instruction + response; unconditioned: the assistant header
  + response) through `curate.lm.hf.HFEngine.response_logprobs`, exactly the calls the IFD scorer makes, in
  bfloat16 (and `score.dtype: auto`'s choice recorded), at a few `batch_tokens` settings.
- embedding: the rows' user text through `curate.embed.load_embedder` (fp16 on CUDA) when curate.embed imports
  (it needs polars, which the GPU image lacks: carry its wheel, see the device notes), else the same
  sentence-transformers calls curate makes (encode, batch 64, max_seq_length 256, longest texts first).
Only python3 with torch, transformers, sentence-transformers and rich is needed (the GPU image has them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0,
           "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
TINY_LM = {**SMOLLM2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 2048}
MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
          "vocab_size": 30522, "max_position_embeddings": 512}
TINY_EMB = {**MINILM, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128, "vocab_size": 2048}


def sample_pairs(limit: int) -> list[tuple[str, str]]:
    """(instruction, response) of the bundled sample rows, without curate's ingest (orjson is not there)."""
    pairs: list[tuple[str, str]] = []
    for f in sorted((ROOT / "data" / "sample").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if "question" in r:
                q, a = r["question"], r["answer"]
            elif "instances" in r:
                inst = r["instances"][0]
                q, a = (r["instruction"] + "\n" + inst.get("input", "")).strip(), inst["output"]
            else:
                q = (r.get("instruction", "") + "\n" + r.get("input", "")).strip()
                a = r.get("response") or r.get("output") or ""
            if q and a:
                pairs.append((q, a))
    step = max(1, len(pairs) // limit) if limit < len(pairs) else 1
    return pairs[::step][:limit]


def make_lm(texts: list[str], shape: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from curate.lm.tiny import train_tokenizer

    tok = train_tokenizer(texts, vocab_size=min(8192, shape["vocab_size"]))
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval(), tok


def make_embedder(texts: list[str], shape: dict, folder: Path) -> str:
    """A random-weight BERT of MiniLM's shape with a WordPiece tokenizer trained here, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=min(8000, shape["vocab_size"]),
                                                           special_tokens=special, show_progress=False))
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    torch.manual_seed(0)
    BertModel(BertConfig(**shape)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_lm(args, pairs, device, lines: list[str]) -> None:
    from curate.lm.base import LMConfig
    from curate.lm.hf import HFEngine, dtype_choice

    texts = [q + "\n" + a for q, a in pairs]
    t0 = time.perf_counter()
    model, tok = make_lm(texts, TINY_LM if args.tiny else SMOLLM2, device)
    n_params = sum(p.numel() for p in model.parameters())
    shape = "a tiny shape" if args.tiny else "SmolLM2-135M's shape"
    lines.append(f"- LM: random LlamaForCausalLM of {shape}, "
                 f"{n_params / 1e6:.1f}M parameters, built in {time.perf_counter() - t0:.1f} s; "
                 f"`score.dtype: auto` here -> {json.dumps(dtype_choice('auto', str(device)))}")
    prompts = [[{"role": "user", "content": q}] for q, _ in pairs]
    responses = [a for _, a in pairs]
    all_prompts, all_resp = prompts + [[]] * len(pairs), responses * 2  # IFD: conditioned, unconditioned
    lines.append("")
    lines.append("| batch_tokens | rows | sequences | tokens | seconds | tokens/s | rows/s (both passes) | peak GiB |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for bt in args.batch_tokens:
        eng = HFEngine(LMConfig("smollm2-shape-random", max_length=args.max_length, dtype="bfloat16",
                                batch_tokens=bt, device=str(device)), model=model, tokenizer=tok)
        tokens = sum(len(eng.encode(p, r).ids) for p, r in zip(all_prompts, all_resp, strict=True))
        eng.response_logprobs(all_prompts[:8], all_resp[:8])  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        out = eng.response_logprobs(all_prompts, all_resp)
        sync(device)
        secs = time.perf_counter() - t0
        assert len(out) == len(all_prompts) and all(torch.isfinite(torch.as_tensor(x)).all() for x in out)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        lines.append(f"| {bt} | {len(pairs)} | {len(all_prompts)} | {tokens:,} | {secs:.2f} | "
                     f"{tokens / secs:,.0f} | {len(pairs) / secs:,.1f} | {peak:.2f} |")
        print(lines[-1], flush=True)


def bench_embed(args, pairs, device, lines: list[str]) -> None:
    texts = [q for q, _ in pairs]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_embedder(texts, TINY_EMB if args.tiny else MINILM, Path(tmp) / "minilm-shape")
        try:
            from curate.embed import load_embedder

            emb = load_embedder(path, device=str(device), max_seq_length=256)
            how, encode = f"curate.embed.load_embedder ({emb.dtype})", emb.encode
        except ImportError as e:  # polars absent: the same sentence-transformers calls curate makes
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(path, device=str(device), local_files_only=True)
            st.max_seq_length = 256
            if device.type == "cuda":
                st.half()

            def encode(batch: list[str], batch_size: int = 64):
                return st.encode(batch, batch_size=batch_size, normalize_embeddings=False, convert_to_numpy=True,
                                 show_progress_bar=False)

            how = f"sentence-transformers directly, as curate.embed does ({e})"
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # curate embeds longest first
        ordered = [texts[i] for i in order]
        encode(ordered[:64], batch_size=64)  # warm-up
        lines.append("")
        shape = "a tiny shape" if args.tiny else "all-MiniLM-L6-v2's shape"
        lines.append(f"- embedding: random BertModel of {shape} "
                     f"via {how}; user text of each row, max_seq_length 256")
        lines.append("")
        lines.append("| batch_size | rows | seconds | rows/s |")
        lines.append("|---|---|---|---|")
        for bs in args.embed_batch:
            sync(device)
            t0 = time.perf_counter()
            vecs = encode(ordered, batch_size=bs)
            sync(device)
            secs = time.perf_counter() - t0
            assert len(vecs) == len(ordered)
            lines.append(f"| {bs} | {len(ordered)} | {secs:.2f} | {len(ordered) / secs:,.0f} |")
            print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3675)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--embed-batch", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of this script on a CPU")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "gpu_oneshot.md"))
    args = ap.parse_args()
    os.environ.setdefault("CURATE_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    pairs = sample_pairs(args.rows)
    lines = ["# GPU one-shot: HF engine (SmolLM2-135M shape, random weights) and embedding stage", "",
             f"Command: `python3 bench/gpu_oneshot.py {' '.join(sys.argv[1:])}`",
             f"Machine: {platform.node()}, GPU {gpu}, torch {torch.__version__}, device {device}; "
             f"{len(pairs)} rows of data/sample", ""]
    bench_lm(args, pairs, device, lines)
    bench_embed(args, pairs, device, lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
