"""The LM interface every model-based scorer uses, and the prompt/response encoding both engines share.

Why the encoding lives here: the response-token span is the main reproducibility hazard for IFD, GRAPE and
DONOD (docs/methods.md §9). Both engines get their token ids from `Encoder.encode`, so the transformers and vLLM
engines score exactly the same ids, and a tokeniser never sees prompt and response as one string (a BPE merge
across the boundary cannot shift the span).

Span definition (stated once):
- prompt ids  = the rendered prompt (chat template with `add_generation_prompt=True`, or the plain/alpaca
  text template), tokenised on its own, without extra special tokens; the plain/alpaca templates start with
  BOS when the tokenizer has one (chat templates add their own).
- response ids = tokens of the response text on its own + the template's end-of-turn tokens (chat: the
  text the template writes after the content, trailing whitespace dropped, e.g. `<|im_end|>`; plain/alpaca:
  the EOS token when the tokenizer has one). `Encoded.n_end` says how many end tokens there are.
- an EMPTY prompt (`[]`) means unconditioned (IFD's s(A)): the prompt is a fixed minimal prefix,
  `unconditioned_prefix="template"` (default) = BOS + the template's assistant header (chat: e.g.
  `<|im_start|>assistant\\n`; alpaca: Cherry's `### Response:`; plain: `Assistant:`); `"bos"` = BOS only;
  any other string = that literal text after BOS.
- truncation: a response longer than `max_length - 1` keeps its first `max_length - 1` tokens (so at least
  one conditioning token remains); then the prompt is cut on `truncation_side` to fit. The arrays returned
  for one response are therefore always prefixes of the same token sequence: align two runs (IFD's
  conditioned / unconditioned passes) by their common length.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Message = dict[str, str]  # {"role": ..., "content": ...}

TEMPLATES = ("auto", "chat", "plain", "alpaca")

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


class LMError(RuntimeError):
    """An engine failed in a way the user can act on (bad model path, server died, ...)."""


@dataclass(frozen=True)
class LMConfig:
    """What identifies an engine's numbers: everything here that changes a score is in `signature()`."""

    model: str  # HF name (resolved offline) or local path
    revision: str | None = None
    template: str = "auto"  # "auto" = the tokenizer's chat template if it has one, else "plain"; or "plain"/"alpaca"
    max_length: int = 1024
    truncation_side: str = "left"  # which side of the PROMPT is cut when prompt + response > max_length
    dtype: str = "float32"
    batch_tokens: int = 16384  # HF: tokens per length-bucketed batch (padded tokens count)
    trust_remote_code: bool = False
    device: str | None = None  # None = cuda if available else cpu
    unconditioned_prefix: str = "template"  # "template" | "bos" | literal text; see module docstring

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass
class HiddenLogits:
    """Final hidden states and logits at the positions that predict the response tokens (DONOD)."""

    hidden: np.ndarray  # (T, d)
    logits: np.ndarray  # (T, V)
    targets: np.ndarray  # (T,) int: the response token ids


@dataclass
class Encoded:
    """Token ids of one (prompt, response) pair after rendering and truncation."""

    prompt_ids: list[int]
    response_ids: list[int]
    n_end: int = 0  # trailing end-of-turn tokens inside response_ids (after truncation)
    truncated: bool = False

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


@dataclass
class _Template:
    kind: str  # chat | plain | alpaca
    header: str = ""  # assistant header text (generation prompt) used for the unconditioned prefix
    end_text: str = ""  # chat: text after the assistant content (stripped)
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sha(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _check_messages(messages: Sequence[Message]) -> None:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"a message must be a dict with 'role' and 'content', got {m!r}")


def render_plain(messages: Sequence[Message]) -> str:
    """Role-tagged plain text: 'User: ...\\n\\nAssistant: ' (ends with the assistant header)."""
    tags = {"system": "System", "user": "User", "assistant": "Assistant"}
    parts = [f"{tags.get(m['role'], m['role'].capitalize())}: {m['content']}\n\n" for m in messages]
    return "".join(parts) + "Assistant:"


def render_alpaca(messages: Sequence[Message]) -> str:
    """Stanford Alpaca / Cherry prompt; earlier turns become Instruction/Response pairs; ends '### Response:'."""
    system = " ".join(m["content"] for m in messages if m["role"] == "system") or ALPACA_PREAMBLE
    parts = [system, "\n\n"]
    for m in messages:
        if m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"### Response:\n{m['content']}\n\n")
    parts.append("### Response:")
    return "".join(parts)


class Encoder:
    """Renders conversations and tokenises prompt and response separately; shared by both engines."""

    def __init__(self, tokenizer: Any, config: LMConfig):
        self.tok = tokenizer
        self.config = config
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.template = self._resolve_template()
        self._prefix_ids = self._unconditioned_ids()

    # -- template ---------------------------------------------------------------------------------------------
    def _resolve_template(self) -> _Template:
        kind = self.config.template
        chat_template = getattr(self.tok, "chat_template", None)
        if kind == "auto":
            kind = "chat" if chat_template else "plain"
        if kind == "plain":
            return _Template("plain", header="Assistant:", fingerprint="plain")
        if kind == "alpaca":
            return _Template("alpaca", header="### Response:", fingerprint="alpaca")
        if not chat_template:
            raise ValueError(f"template='chat' but the tokenizer of {self.config.model} has no chat template")
        probe = [{"role": "user", "content": "PROBE-Q"}]
        with_gen = self._apply(probe, True)
        without = self._apply(probe, False)
        header = with_gen[len(without):] if with_gen.startswith(without) else ""
        full = self._apply([*probe, {"role": "assistant", "content": "PROBE-A"}], False)
        if not full.startswith(with_gen) or "PROBE-A" not in full[len(with_gen):]:
            raise ValueError(
                "the chat template does not render an assistant turn as <prompt with generation prompt> + "
                "<content>...; use template='plain' or 'alpaca' for this model"
            )
        tail = full[len(with_gen):]
        end_text = tail[tail.index("PROBE-A") + len("PROBE-A"):].rstrip()
        return _Template("chat", header=header, end_text=end_text, fingerprint="chat:" + _sha(chat_template))

    def _apply(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def _unconditioned_ids(self) -> list[int]:
        mode = self.config.unconditioned_prefix
        if mode == "bos":
            text = ""
        elif mode == "template":
            text = self.template.header
        else:
            text = mode
        if self.template.kind == "chat" and mode == "template":
            # the chat header is what the template emits after BOS; BOS itself only if the template starts with it
            rendered = self._apply([{"role": "user", "content": "x"}], False)
            bos_text = self.tok.bos_token or ""
            # ... and not when the header itself starts with it (ChatML models whose BOS is <|im_start|>: SmolLM2)
            add_bos = bool(bos_text) and rendered.startswith(bos_text) and not text.startswith(bos_text)
            ids = (self.bos if add_bos else []) + self._text_ids(text)
        else:
            ids = self.bos + self._text_ids(text)
        if not ids:
            raise ValueError(
                f"{self.config.model}: the tokenizer has no BOS token and the template no assistant header, "
                "so an unconditioned prefix cannot be built; set unconditioned_prefix to some text"
            )
        return ids

    # -- public -----------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.template.fingerprint

    def render_prompt(self, messages: Sequence[Message]) -> str:
        _check_messages(messages)
        kind = self.template.kind
        if kind == "chat":
            return self._apply(messages, True)
        return render_plain(messages) if kind == "plain" else render_alpaca(messages)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        if len(messages) == 0:
            return list(self._prefix_ids)
        text = self.render_prompt(messages)
        if self.template.kind == "chat":
            return self._text_ids(text)  # the template writes its own special tokens
        return self.bos + self._text_ids(text)

    def response_ids(self, response: str) -> tuple[list[int], int]:
        """Response content tokens + end-of-turn tokens, and how many end tokens there are."""
        end = self._text_ids(self.template.end_text) if self.template.kind == "chat" else list(self.eos)
        return self._text_ids(response) + end, len(end)

    def end_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn (generation stops there)."""
        ids = set(self.eos)
        if self.template.kind == "chat":
            end = self._text_ids(self.template.end_text)
            if end:
                ids.add(end[0])
        return sorted(ids)

    def encode(self, messages: Sequence[Message], response: str) -> Encoded:
        p = self.prompt_ids(messages)
        r, n_end = self.response_ids(response)
        return truncate(p, r, n_end, self.config.max_length, self.config.truncation_side)

    def option_id(self, option: str) -> int:
        """The single token id of a choice option ("1", " A", ...); ValueError if it is not one token."""
        ids = self._text_ids(option)
        if len(ids) == 1:
            return ids[0]
        tid = self.tok.convert_tokens_to_ids(option)  # sentencepiece pieces such as "1" (encode gives "▁","1")
        if isinstance(tid, int) and tid != self.tok.unk_token_id and tid >= 0:
            return tid
        raise ValueError(
            f"choice option {option!r} is not a single token for {self.config.model} (it tokenises to "
            f"{len(ids)} tokens: {self.tok.convert_ids_to_tokens(ids)}); use options that are one token each"
        )

    def raw_prompt_ids(self, prompt: str) -> list[int]:
        """A raw-string judge prompt (deita templates) with the tokenizer's usual special tokens (BOS).

        Too long for max_length, it loses its middle (`clip_middle`), whatever `truncation_side` says: a judge
        prompt opens with the instructions and ends at the answer slot, and cutting either end left the judge
        reading the tail of a long response with no instructions and no question (or no slot to answer in)."""
        return self._cut_middle(list(self.tok(prompt, add_special_tokens=True)["input_ids"]), self.config.max_length)

    def generation_prompt_ids(self, prompts: Sequence[Sequence[Message]], max_tokens: int) -> list[list[int]]:
        """Each prompt's ids, at most max_length - `max_tokens` so the new tokens fit; ValueError when no prompt
        token would fit.

        Too long, a prompt loses its middle (`clip_middle`, as a judge prompt does), whatever `truncation_side`
        says: its start holds the instructions (CLEAR's reflection prompt, the task before a long input) and its
        end the question's end and the assistant header that generation continues from. Clipped on the left,
        CLEAR's default reflection prompts (256 tokens left of 512) lost their instructions and question; on the
        right, a prompt lost the assistant header (`GENERATION_CUT`)."""
        limit = self.config.max_length - max_tokens
        if limit < 1:
            raise ValueError(f"max_tokens {max_tokens} leaves no room for a prompt in max_length "
                             f"{self.config.max_length}")
        return [self._cut_middle(self.prompt_ids(p), limit) for p in prompts]

    def _cut_middle(self, ids: list[int], limit: int) -> list[int]:
        """`clip_middle` with the ELISION marker, tokenized only for a prompt that is cut."""
        return ids if len(ids) <= limit else clip_middle(ids, limit, self._text_ids(ELISION))


def clip(ids: list[int], limit: int, side: str) -> list[int]:
    """At most `limit` ids, cut from the start ("left": the end of a prompt, next to the answer, stays) or the end."""
    if len(ids) <= limit:
        return ids
    return ids[len(ids) - limit:] if side == "left" else ids[:limit]


#: what a judge or generation prompt cut in the middle shows where its middle was
ELISION = "\n[...]\n"
#: bump when generation prompts are cut differently (2: their middle, not the truncation side; in the keys of
#: eval units whose Q/A prompts are cut)
GENERATION_CUT = 2


def clip_middle(ids: list[int], limit: int, marker: list[int]) -> list[int]:
    """At most `limit` ids: the first and the last halves of what fits, `marker` between them (left-clipped when
    the marker itself does not fit)."""
    if len(ids) <= limit:
        return ids
    keep = limit - len(marker)
    if keep < 2:
        return clip(ids, limit, "left")
    head = keep // 2
    return ids[:head] + list(marker) + ids[len(ids) - (keep - head):]


def truncate(prompt: list[int], response: list[int], n_end: int, max_length: int, side: str) -> Encoded:
    """Apply the truncation rule of the module docstring."""
    truncated = False
    if len(response) > max_length - 1:
        cut = max_length - 1
        n_end = max(0, n_end - (len(response) - cut))
        response = response[:cut]
        truncated = True
    room = max_length - len(response)
    if len(prompt) > room:
        prompt = clip(prompt, room, side)
        truncated = True
    return Encoded(prompt, response, n_end, truncated)


def weights_fingerprint(path: str | Path) -> str:
    """Content hash of a local model's weight files (full sha256 when small, else size + head/tail blocks)."""
    p = Path(path)
    files = sorted(x for x in p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        return "nofiles"
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= 256 << 20:
                while block := fh.read(1 << 20):
                    h.update(block)
            else:
                h.update(fh.read(4 << 20))
                fh.seek(size - (4 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


class Engine(ABC):
    """A causal LM behind one small interface (docs/methods.md §9): logprobs, generation, choice probabilities."""

    config: LMConfig
    encoder: Encoder
    kind: str = "?"

    def signature(self) -> str:
        """Stable key for score stores: model + weights + template + max_length + truncation + prefix + dtype.

        The engine kind is not part of it: both engines score the same ids (parity test) and agree to
        float32 rounding.
        """
        c = self.config
        return (
            f"{Path(c.model).name}@{self.weights_id()}|tpl={self.encoder.fingerprint}|max={c.max_length}"
            f"|trunc={c.truncation_side}|uncond={_sha(c.unconditioned_prefix, 8)}|dtype={c.dtype}"
        )

    def weights_id(self) -> str:
        c = self.config
        if os.path.isdir(c.model):
            return weights_fingerprint(c.model)
        return c.revision or "main"

    def encode(self, messages: Sequence[Message], response: str) -> Encoded:
        return self.encoder.encode(messages, response)

    @abstractmethod
    def response_logprobs(
        self,
        prompts: Sequence[Sequence[Message]],
        responses: Sequence[str],
        *,
        on_batch: Callable[[list[int], list[np.ndarray]], None] | None = None,
    ) -> list[np.ndarray]:
        """Per-token log p of each response's tokens (float32; content + end-of-turn tokens, see module doc).

        `on_batch(indices, arrays)` is called as each batch finishes, so a caller can store results
        before a later batch fails.
        """

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[Message]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        max_tokens: int = 256,
        seed: int = 0,
    ) -> list[list[str]]:
        """n sampled continuations per prompt (greedy when temperature == 0), stopping at end of turn."""

    @abstractmethod
    def choice_probs(self, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        """(len(prompts), len(options)) next-token probabilities restricted to the options, renormalised."""

    def hidden_and_logits(
        self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]
    ) -> list[HiddenLogits]:
        raise NotImplementedError(
            f"hidden_and_logits needs the transformers engine (kind='hf'); the {self.kind} engine cannot "
            "return hidden states"
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (servers, GPU memory)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_pairs(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


_TOKENIZER_FILES = ("tokenizer*", "*.model", "vocab*", "*.tiktoken", "merges.txt", "spiece*")  # any one will do


def check_model_folder(model: str) -> None:
    """LMError naming what is wrong with a local model folder (missing, not a model, no tokenizer, pickle-only
    weights) before transformers is asked, whose own messages for these cases are pages long or misleading
    ("Repo id must be in the form ..." for a mistyped path). HF names (not local folders) pass unchecked."""
    p = Path(model).expanduser()
    why = ""
    if not p.exists():
        if p.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
            why = "no such folder"
    elif not p.is_dir():
        why = "it is a file; give the HF model folder that holds it"
    elif not (p / "config.json").is_file():
        why = "not a HF model folder (no config.json)"
    elif not any(f.is_file() for pattern in _TOKENIZER_FILES for f in p.glob(pattern)):
        why = "the folder has no tokenizer files (tokenizer.json, tokenizer.model, ...)"
    elif not list(p.glob("*.safetensors")) and list(p.glob("*.bin")) + list(p.glob("*.pt")) + list(p.glob("*.pth")):
        why = ("it has only pickle weights (.bin/.pt) and curate loads safetensors only: convert them, e.g. "
               "model.save_pretrained(folder, safe_serialization=True)")
    if why:
        raise LMError(f"cannot load model {model!r}: {why}")


def load_tokenizer(config: LMConfig) -> Any:
    """The model's tokenizer (offline: local path or the HF cache), trust_remote_code as configured."""
    from transformers import AutoTokenizer

    check_model_folder(config.model)
    try:
        return AutoTokenizer.from_pretrained(
            config.model, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise LMError(f"cannot load the tokenizer of {config.model!r}: {e}") from None
