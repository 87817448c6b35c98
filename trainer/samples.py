"""Samples to read: at each evaluation, greedy continuations of a few fixed prompts from each validation set, the
base model's (step 0) beside each checkpoint's, in the run's samples.md and in the model card.

A prompt is the start of a validation row: for rows that train only some positions (chat, prompt-completion), the
tokens before the first trained one (the question; its last `max_prompt` tokens); for text, the first
min(max_prompt, half the row) tokens. Prompts are spread over the set (rows 0, n/k, 2n/k, ...), the same at every
evaluation. Generation is greedy, on the first process, bounded by --sample-tokens new tokens per prompt; under FSDP
(weights sharded across processes) there are no samples.
"""
from __future__ import annotations

import logging

import torch

from .card import md_block, md_text

log = logging.getLogger(__name__)

MAX_SAMPLES = 8  # prompts per evaluation set
MAX_SAMPLE_TOKENS = 512  # new tokens per prompt
MAX_PROMPT = 64  # prompt tokens


def prompts(eval_sets: dict, per_set: int, max_prompt: int = MAX_PROMPT) -> list[tuple[str, list[int]]]:
    """(set name, prompt token ids) for `per_set` rows spread over each evaluation set."""
    out = []
    for name, rows in eval_sets.items():
        n = len(rows)
        picks = sorted({i * n // per_set for i in range(per_set)}) if n else []
        for i in picks:
            b = rows.batch([i])
            ids, length, mask = b["input_ids"][0], int(b["length"][0]), b["label_mask"][0]
            trained = torch.nonzero(mask[: max(length - 1, 0)]).flatten()
            if len(trained) and trained[0] > 0:  # the question, up to the first trained label
                end = int(trained[0]) + 1
                out.append((name, ids[max(0, end - max_prompt):end].tolist()))
            elif length >= 2:
                out.append((name, ids[: max(1, min(max_prompt, length // 2))].tolist()))
    return out


@torch.no_grad()
def generate(model, tokenizer, accelerator, prompt_ids: list[tuple[str, list[int]]], max_new: int) -> list[dict]:
    """Greedy continuations, one prompt at a time (no padding to get wrong): [{set, prompt, text}]."""
    model.eval()
    out = []
    eos = tokenizer.eos_token_id
    for name, ids in prompt_ids:
        x = torch.tensor([ids], device=accelerator.device)
        with accelerator.autocast():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                               do_sample=False, use_cache=True, pad_token_id=eos if eos is not None else 0)
        out.append({"set": name, "prompt": tokenizer.decode(ids, skip_special_tokens=True),
                    "text": tokenizer.decode(y[0, len(ids):].tolist(), skip_special_tokens=True)})
    model.train()
    return out


def render(evals: list[dict], title: str) -> str:
    """samples.md: per prompt, the base model's continuation and each evaluated step's, as fenced blocks (a model's
    text may hold anything: no line of it can end its block or add Markdown)."""
    with_samples = [e for e in evals if e.get("samples")]
    if not with_samples:
        return ""
    lines = [f"# Samples: {md_text(title)}", "",
             "Greedy continuations of the same prompts (the start of validation rows) at each evaluation; step 0 is "
             "the model before training.", ""]
    first = with_samples[0]["samples"]
    for k, s in enumerate(first):
        lines += [f"## {md_text(s['set'])} prompt {k + 1}", "", *md_block(s["prompt"]), ""]
        for e in with_samples:
            if k < len(e["samples"]):
                lines += [f"step {e['step']}:", "", *md_block(e["samples"][k]["text"]), ""]
    return "\n".join(lines)


def card_section(base: dict, record: dict) -> list[str]:
    """The model card's samples: each prompt, the base model's continuation and this checkpoint's."""
    if not record.get("samples"):
        return []
    lines = ["## Samples", "", f"Greedy continuations at step {record['step']}, beside the base model's (step 0):", ""]
    for k, s in enumerate(record["samples"]):
        lines += [f"**{md_text(s['set'])}**, prompt:", "", *md_block(s["prompt"]), ""]
        if base.get("samples") and k < len(base["samples"]) and base is not record:
            lines += ["base model:", "", *md_block(base["samples"][k]["text"]), ""]
        lines += ["this checkpoint:", "", *md_block(s["text"]), ""]
    return lines
