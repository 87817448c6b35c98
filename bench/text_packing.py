"""Base perplexity of plain text packed by concatenation and packed as documents, against each document alone.

    python bench/text_packing.py --model MODEL_FOLDER --data docs.jsonl --out bench/out/text_packing
    python bench/text_packing.py --model MODEL_FOLDER --data docs.jsonl --seq-lens 256,1024 --max-documents 500

For each --seq-lens value, the model's perplexity (exp of the mean next-token NLL) over the documents of --data,
three ways:

1. reference: plain transformers, each document alone. Its tokens (the tokenizer's special tokens and a final EOS)
   are cut into windows of seq_len: the first holds its first seq_len tokens, each next one BOS + the next
   seq_len - 1 tokens where the tokenizer adds a BOS (else the token before the window + the next seq_len - 1); every
   window runs alone and every label but a window's first token counts, so each token of a document counts once.
2. concat: `mft train`'s evaluation path (trainer.inputs.open_eval_sets, StudentLoss, evaluate_perplexity_se) with
   --packing concat, the default for text: documents concatenated and cut into rows, each row starting with BOS
   where the tokenizer adds one; a document's first tokens attend to the end of the one before it in the row.
3. document: the same path with --packing document: documents, and the windows of the longer ones, packed whole,
   each attending only to itself (segment ids), positions restarting at 0.

(3) must equal (1) up to float rounding: it is the check that document packing isolates documents. (2) against (1)
is what concatenation changes in what the model is scored on; the default packing for text is decided from it.
Under a tokenizer that adds a BOS, the three count the same labels (every token of a document but its own BOS);
without one, concatenation also skips the first token of every row. Prints a table and writes <out>/text_packing.json
(the numbers, the options and the machine). The model runs in float32 unless --dtype says otherwise, as `mft train`
evaluates by default.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import fmt, machine_info, say  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def document_ids(tokenizer, text: str) -> list[int]:
    """A document's tokens as both stages encode them: the tokenizer's special tokens, then EOS if it added none."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def adds_bos(tokenizer) -> int | None:
    """The BOS a window starts with: the tokenizer's, where it puts one first (and it is not also the EOS)."""
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return None
    return bos if list(tokenizer("a", add_special_tokens=True)["input_ids"])[:1] == [bos] else None


def windows_alone(ids: list[int], seq_len: int, bos: int | None) -> list[list[int]]:
    out = [ids[:seq_len]]
    for p in range(seq_len, len(ids), seq_len - 1):
        out.append([bos if bos is not None else ids[p - 1]] + ids[p:p + seq_len - 1])
    return out


@torch.no_grad()
def reference(model, tokenizer, texts: list[str], seq_len: int, batch_size: int) -> dict:
    """(1): every window of every document through the model alone (right padding, an attention mask: a causal model
    gives the real tokens the logits they get alone)."""
    device = next(model.parameters()).device
    bos = adds_bos(tokenizer)
    windows = [w for text in texts for w in windows_alone(document_ids(tokenizer, text), seq_len, bos)]
    nll, tokens = 0.0, 0
    for b in range(0, len(windows), batch_size):
        part = windows[b:b + batch_size]
        width = max(len(w) for w in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for i, w in enumerate(part):
            ids[i, :len(w)], mask[i, :len(w)] = torch.tensor(w), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for i, w in enumerate(part):
            n = len(w) - 1
            nll += F.cross_entropy(logits[i, :n].float(), ids[i, 1:n + 1].to(device), reduction="sum").item()
            tokens += n
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": len(windows)}


def through_training(model, tokenizer, data: str, text_field: str, seq_len: int, packing: str, batch_size: int,
                     accelerator) -> dict:
    """(2) and (3): the evaluation sets of `mft train --packing PACKING` and its perplexity."""
    from mft_cache.trainer.config import TrainConfig
    from mft_cache.trainer.evaluate import evaluate_perplexity_se
    from mft_cache.trainer.inputs import open_eval_sets
    from mft_cache.trainer.loss_module import StudentLoss

    cfg = TrainConfig(eval_specialized=data, text_field=text_field, packing=packing, eval_batch_size=batch_size)
    rows = open_eval_sets(cfg, tokenizer, seq_len)["specialized"]
    module = StudentLoss(model, cfg.chunk_size, cfg.loss_impl)
    ppl, se = evaluate_perplexity_se(module, rows, cfg.eval_batch_size, accelerator)
    packed = rows.source
    return {"ppl": ppl, "nll": math.log(ppl), "se": se, "tokens": packed.num_predictions,
            "rows": packed.num_sequences}


def run(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    from mft_cache.models import check_seq_len, load_config, load_model, load_tokenizer
    from mft_cache.rows import read_documents

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = read_documents(args.data, args.text_field).texts
    data = args.data
    if args.max_documents and len(texts) > args.max_documents:
        texts = texts[:args.max_documents]
        data = str(out / "documents.jsonl")  # the same documents for the three ways
        Path(data).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    text_field = args.text_field if data == args.data else "text"
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    config = load_config(args.model)
    for t in seq_lens:
        check_seq_len(config, t, "--seq-lens")
    accelerator = Accelerator(cpu=args.device == "cpu")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, DTYPES[args.dtype], accelerator.device).eval()
    model.config.use_cache = False
    results = []
    for t in seq_lens:
        t0 = time.perf_counter()
        row = {"seq_len": t, "reference": reference(model, tokenizer, texts, t, args.batch_size)}
        for packing in ("concat", "document"):
            row[packing] = through_training(model, tokenizer, data, text_field, t, packing, args.batch_size,
                                            accelerator)
        ref = row["reference"]["ppl"]
        row["concat_vs_reference"] = row["concat"]["ppl"] / ref - 1
        row["document_vs_reference"] = row["document"]["ppl"] / ref - 1
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        say(f"seq len {t}: reference {ref:.4f}, concat {row['concat']['ppl']:.4f}, "
            f"document {row['document']['ppl']:.4f} ({row['seconds']} s)")
    record = {"model": args.model, "data": args.data, "documents": len(texts), "dtype": args.dtype,
              "device": str(accelerator.device), "bos_windows": adds_bos(tokenizer) is not None,
              "results": results, "machine": machine_info()}
    (out / "text_packing.json").write_text(json.dumps(record, indent=2) + "\n")
    for line in table(record):
        say(line)
    return record


def table(record: dict) -> list[str]:
    title = (f"{record['documents']:,} documents of {record['data']}, {record['model']} ({record['dtype']}, "
             f"{record['device']}): perplexity")
    header = ("| seq len | alone (reference) | concat | document | concat vs alone | document vs alone | tokens "
              "(alone / concat / document) |")
    lines = [title, "", header, "|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        lines.append(f"| {r['seq_len']} | {fmt(r['reference']['ppl'], 4)} | {fmt(r['concat']['ppl'], 4)} | "
                     f"{fmt(r['document']['ppl'], 4)} | {r['concat_vs_reference']:+.3%} | "
                     f"{r['document_vs_reference']:+.3%} | {r['reference']['tokens']:,} / {r['concat']['tokens']:,} "
                     f"/ {r['document']['tokens']:,} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a folder (or hub id) of a transformers causal LM")
    p.add_argument("--data", required=True, help="documents: .jsonl (or any source `mft train --eval-*` reads)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-lens", default="256,1024", help="comma-separated row lengths")
    p.add_argument("--max-documents", type=int, default=0, help="the first N documents only (0: all)")
    p.add_argument("--batch-size", type=int, default=4, help="rows (windows) per forward pass")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--device", default="auto", choices=("auto", "cpu"), help="auto: the GPU where there is one")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "text_packing"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
