"""The one fine-tune path: supervised fine-tuning with TRL's `SFTTrainer`, loss on assistant tokens only.

Why one path: `curate eval` (the student per arm), `curate proxy finetune` and the iterative strategy's feedback
(`curate.select.iterative.loss_feedback`) all answer "what does a model learn from these rows?"; one trainer
means one masking rule (the chat template's `{% generation %}` markers: prompt tokens get -100 labels), one
optimizer and one schedule, and the numbers of one are comparable with the others'. It lives in `curate.lm`
so that `curate.select` can use it without importing `curate.eval` (imports point one way).

Templates: a template that already has generation markers is used as is; TRL patches the families it knows;
a ChatML template (curate's proxy and test models, SmolLM2, Qwen) is rewritten with markers when it renders
byte-identical text; a tokenizer without a chat template trains on curate's plain rendering
(`User: ...` / `Assistant: ...`, the `plain` template of `curate.lm.base`) ending each answer with EOS.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from curate.lm.base import Message
from curate.progress import progress


@dataclass(frozen=True)
class FinetuneConfig:
    """What changes a fine-tune's numbers (besides the model, the rows and the seed)."""

    epochs: float = 1.0
    max_steps: int | None = None  # caps optimizer steps (None: epochs decide)
    lr: float = 1e-4
    batch_size: int = 8  # rows per optimizer step
    micro_batch: int | None = None  # rows per forward pass (gradients accumulate to batch_size); None: see micro_batch
    max_length: int = 512  # tokens per training sequence (longer ones are truncated)
    lora: bool = False
    lora_r: int = 16
    dtype: str = "auto"  # auto | float32 | bfloat16: bf16 autocast where the scoring engine's auto picks bf16
    loss: str = "auto"  # auto | model | trl: how the loss is computed (see loss_kind)
    threads: int | None = 2  # CPU threads for torch; None: $CURATE_TORCH_THREADS, else every usable core

    def __post_init__(self) -> None:
        if self.loss not in ("auto", "model", "trl"):
            raise ValueError(f"loss must be auto, model or trl, got {self.loss!r}")

    @classmethod
    def of(cls, settings: Any) -> FinetuneConfig:
        """The fine-tune part of any settings object with these attribute names (e.g. `curate.eval.EvalConfig`)."""
        if isinstance(settings, cls):
            return settings
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)})


#: the training template for a tokenizer without a chat template: curate.lm.base.render_plain's text, each
#: assistant turn's content and EOS inside generation markers (a missing BOS/EOS renders as nothing)
PLAIN_TRAINING_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {% generation %}"
    "{{ m['content'] }}{{ eos_token or '' }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}{{ '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _checkpointing_arg(config_class: type) -> str:
    """transformers 5.24 renamed gradient_checkpointing; the old name warns on every fine-tune (in a CI log)."""
    names = {f.name for f in fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def micro_batch(config: FinetuneConfig) -> int:
    """Rows per forward pass. The optimizer still steps once per `batch_size` rows with the same loss (the trainer
    normalises by the whole step's assistant tokens and groups the step's rows by length), so this changes speed,
    not the training: 2 on a CPU, where each padded position costs compute and one long row pads its whole
    micro-batch (SmolLM2, 192 Alpaca rows: 149 -> 204 tokens/s against micro-batches of 8, same loss to 4e-4;
    bench/results/eval.md); the whole batch on a GPU."""
    import torch

    want = config.micro_batch or (config.batch_size if torch.cuda.is_available() else 2)
    want = max(1, min(want, config.batch_size))
    while config.batch_size % want:  # the largest divisor of batch_size not above the wish
        want -= 1
    return want


def loss_kind(config: FinetuneConfig) -> str:
    """How the training loss is computed; both are mean cross-entropy over the step's assistant tokens.

    - "trl": TRL's fused LM head (SFTTrainer's own loss): projects only labelled positions, in tiles, never holding
      the full logits. On a GPU it saves the memory a large vocabulary costs. On a CPU it computes the LM head in
      float32 (TRL's `_addmm_fp32` upcasts both operands off CUDA) and, with its metrics, was 43% of a SmolLM2
      step in a profile.
    - "model": the model's own loss through `transformers.Trainer.compute_loss` (the LM head under bf16 autocast,
      cross-entropy in float32, normalised by the step's tokens): 1.3x the tokens/s of "trl" on this CPU, train
      loss equal to 7e-4 (bench/results/eval.md, section 7).
    auto: "model" on a CPU, "trl" on a GPU.
    """
    if config.loss != "auto":
        return config.loss
    import torch

    return "trl" if torch.cuda.is_available() else "model"


@functools.cache
def _model_loss_trainer() -> type:
    """SFTTrainer with the model's own loss (`loss_kind` "model"); everything else is TRL's."""
    from transformers import Trainer
    from trl import SFTTrainer

    class ModelLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            inputs["use_cache"] = False  # as TRL's compute_loss: no KV cache while training
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return ModelLossSFTTrainer


# -- threads ----------------------------------------------------------------------------------------------
def _set_threads(n: int | None) -> None:
    """CPU threads for torch; None: curate's engine default ($CURATE_TORCH_THREADS, else every usable core)."""
    import torch

    if not torch.cuda.is_available():
        if n is None:
            from curate.lm.hf import default_threads

            n = default_threads()
        torch.set_num_threads(max(1, n))


# -- chat template with generation markers -----------------------------------------------------------------
def _chatml_training_template(bos: bool, default_system: str | None) -> str:
    sys_block = ("{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n" + default_system
                 + "<|im_end|>\n{% endif %}") if default_system is not None else ""
    return (("{{ bos_token }}" if bos else "") + "{% for m in messages %}" + sys_block
            + "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}"
            "<|im_end|>{% endgeneration %}{{ '\\n' }}"  # a literal newline after a block tag would be trimmed
            "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


_PROBES: list[list[Message]] = [
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2 x"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
]


def training_chat_template(tokenizer: Any) -> str:
    """The student's chat template with `{% generation %}` markers around each assistant turn's content and
    end-of-turn token, rendering byte-identical text (checked on probe conversations).

    A tokenizer without a chat template gets `PLAIN_TRAINING_TEMPLATE` (curate.lm's "plain" rendering).
    Order: the template itself if it has markers; TRL's patched template for families it knows; a ChatML
    template (curate's test/proxy models, SmolLM2, Qwen-style default system prompt) when it renders the same.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    own = tokenizer.chat_template
    if not own:
        return PLAIN_TRAINING_TEMPLATE
    if has_generation_markers(own):
        return own
    try:
        patched = get_training_chat_template(tokenizer)
        if patched:
            return patched
    except ValueError:
        pass

    def render(template: str, msgs: list[Message], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)

    first = render(own, _PROBES[0], False)
    for bos in (False, True):  # SmolLM2's BOS is <|im_start|> itself: try both readings
        if bos and not (tokenizer.bos_token and first.startswith(tokenizer.bos_token)):
            continue
        body = first[len(tokenizer.bos_token):] if bos else first
        default_system = None
        if body.startswith("<|im_start|>system\n") and "<|im_end|>" in body:
            default_system = body[len("<|im_start|>system\n"):body.index("<|im_end|>")]
        candidate = _chatml_training_template(bos, default_system)
        if all(render(own, p, g) == render(candidate, p, g) for p in _PROBES for g in (False, True)):
            return candidate
    raise ValueError("cannot add {% generation %} markers to the student's chat template (not ChatML and not one "
                     "TRL knows); give a student whose template has them")


#: bump when keep_responses cuts prompts differently (in the keys of eval units and feedback rounds that it cuts)
PROMPT_CUT = 1


def _first_response(conv: Sequence[Message]) -> int | None:
    return next((i for i, m in enumerate(conv) if m["role"] == "assistant"), None)


def prompt_overflow(tokenizer: Any, convs: Sequence[Sequence[Message]], max_length: int) -> list[int]:
    """Per conversation, how many tokens its prompt (every turn before the first response, as rendered) is over
    what leaves that response min(its tokens + 1, max_length // 2) of the max_length training tokens; 0 when it
    fits. `tokenizer` carries the training template."""
    out = []
    for conv in convs:
        first = _first_response(conv)
        if not first:
            out.append(0)
            continue
        prompt = tokenizer.apply_chat_template(list(conv[:first]), tokenize=False, add_generation_prompt=True)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        resp = len(tokenizer(conv[first]["content"], add_special_tokens=False)["input_ids"])
        out.append(max(0, n - (max_length - min(resp + 1, max_length // 2))))
    return out


def keep_responses(tokenizer: Any, convs: Sequence[Sequence[Message]], max_length: int) -> list[list[Message]]:
    """The conversations with the start of an over-long prompt cut (system prompt first, then the turns in order,
    token by token), so the first response keeps its share of the max_length tokens (`prompt_overflow`).

    Why: TRL keeps a row's first max_length tokens and drops a row left without a response token, so a row with a
    long prompt trained nothing (or a few tokens of its answer) while the loss measurement
    (`curate.lm.evaluate`) cuts the prompt's start and keeps the response: train as the student is measured."""
    out = [[dict(m) for m in conv] for conv in convs]
    over = prompt_overflow(tokenizer, out, max_length)
    for k, conv in enumerate(out):
        for _ in range(4):  # a cut can re-tokenize a few tokens longer: cut again
            if over[k] <= 0:
                break
            left = over[k] + 2
            first = _first_response(conv) or 0
            for j in range(first):
                ids = tokenizer(conv[j]["content"], add_special_tokens=False)["input_ids"]
                keep = 1 if j == first - 1 else 0  # the last turn before the response keeps a token
                cut = min(left, max(len(ids) - keep, 0))
                if cut:
                    conv[j]["content"] = tokenizer.decode(ids[cut:]) if cut < len(ids) else ""
                    left -= cut
                if left <= 0:
                    break
            over[k] = prompt_overflow(tokenizer, [conv], max_length)[0]
    return out


def _step_progress(bar: Any, label: str) -> Any:
    """A TrainerCallback that reports optimizer steps to `bar` (curate's progress: steps done, elapsed, time left)
    under `label`: the trainer's own tqdm bar and loss prints are off, and a 1,000-row fine-tune on a CPU runs for
    most of an hour."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.task = bar.add_task(label, total=state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            bar.update(self.task, completed=state.global_step)

    return StepProgress()


def sft_trainer(model: Any, tokenizer: Any, convs: Sequence[Sequence[Message]], config: FinetuneConfig, seed: int,
                output_dir: str | Path, dtype: str) -> Any:
    """The `SFTTrainer` every curate fine-tune runs: assistant-only loss, cosine schedule with 10 % warm-up, no
    weight decay, no checkpoints, no packing, batches grouped by length, the loss `loss_kind(config)`; LoRA (peft)
    when config.lora. `tokenizer` must already carry a training template (`training_chat_template`);
    `micro_batch(config)` rows per forward pass, accumulated to config.batch_size rows per step. Exposed so tests
    can read its batches."""
    import datasets
    import torch
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    ds = datasets.Dataset.from_list([{"messages": c} for c in keep_responses(tokenizer, convs, config.max_length)])
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    micro = micro_batch(config)
    args = SFTConfig(
        output_dir=str(output_dir), assistant_only_loss=True, max_length=config.max_length,
        per_device_train_batch_size=micro, gradient_accumulation_steps=config.batch_size // micro,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1, learning_rate=config.lr, lr_scheduler_type="cosine",
        warmup_steps=0.1, weight_decay=0.0, seed=seed, data_seed=seed, bf16=dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0, packing=False, dataset_num_proc=None,
        # speed (bench/results/eval.md, same rows and run): batches of similar length pad less (1.7x tokens/s
        # on Alpaca rows); activation checkpointing (TRL's default) saves memory a small student on a CPU
        # does not need and costs a recomputed forward, so it is on only on a GPU
        train_sampling_strategy="group_by_length", **{_checkpointing_arg(SFTConfig): torch.cuda.is_available()},
    )
    trainer_class = _model_loss_trainer() if loss_kind(config) == "model" else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                            peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # a loss dict printed every 10 steps; the stats carry the loss
    return trainer


def finetune(student: str, convs: Sequence[Sequence[Message]], config: Any, seed: int,
             out_dir: str | Path | None = None, dtype: str | None = None,
             label: str = "fine-tune") -> tuple[Any, Any, dict[str, Any]]:
    """SFT of the model folder `student` on `convs` (see `sft_trainer`). `config`: a `FinetuneConfig` or any
    settings with its field names (`curate.eval.EvalConfig`); `out_dir`: the trainer's working folder (default a
    temporary one); `dtype`: an already resolved dtype (default: config.dtype resolved by the scoring engine's
    `curate.lm.hf.resolve_dtype`); `label`: its name in the progress lines (one per optimizer step).

    Returns (model, tokenizer, stats); the model is merged (LoRA) and in eval mode, on the training device; the
    tokenizer carries the training template (it renders the same text as the model's own).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    config = FinetuneConfig.of(config)
    if not convs:
        raise ValueError("nothing to fine-tune on: no conversations given")
    if dtype is None:  # `auto`: the scoring engine's decision, so one machine never scores and trains apart
        from curate.lm.hf import resolve_dtype

        dtype = resolve_dtype(config.dtype)
    _set_threads(config.threads)
    set_seed(seed)
    tok = AutoTokenizer.from_pretrained(student)
    tok.chat_template = training_chat_template(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, use_safetensors=True)
    with tempfile.TemporaryDirectory(prefix="curate-ft-") as tmp:
        trainer = sft_trainer(model, tok, convs, config, seed, out_dir or tmp, dtype)
        t0 = time.perf_counter()
        with progress() as bar:  # closed however training ends
            trainer.add_callback(_step_progress(bar, label))
            result = trainer.train()
        seconds = time.perf_counter() - t0
        model = trainer.model
        if config.lora:
            model = model.merge_and_unload()
    n_tokens = int(sum(len(x) for x in trainer.train_dataset["input_ids"]))
    stats = {"rows": len(convs), "steps": int(result.global_step),
             "micro_batch": int(trainer.args.per_device_train_batch_size), "loss": loss_kind(config),
             "train_loss": round(float(result.training_loss), 5),
             "train_seconds": round(seconds, 2), "epoch_tokens": n_tokens,
             "tokens_per_second": round(n_tokens * float(result.metrics.get("epoch", 1.0) or 1.0) / seconds, 1)}
    return model.eval(), tok, stats


def save_finetuned(model: Any, tokenizer: Any, out_dir: str | Path, *, chat_template: str | None) -> str:
    """Save a fine-tuned model in HF format (safetensors) with its tokenizer, restoring the model's own chat
    template (`chat_template`, None when it had none) in place of the training template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = chat_template
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


__all__ = ["FinetuneConfig", "PLAIN_TRAINING_TEMPLATE", "finetune", "loss_kind", "micro_batch", "save_finetuned",
           "sft_trainer", "training_chat_template"]
