"""`mft cache`: the frozen teacher reads the finetuning set once and writes the cache.

`build_cache` is three steps: `open_job` (read and pack the data, size the teacher from its config, open the
folder, and load the teacher's weights unless the cache is already complete),
`teach_shards` (the teacher's pass over this process's missing shards, written as they complete) and
`finish_cache` (documents.npy and the manifest, written last).

On N processes (`torchrun --nproc_per_node N -m mft_cache.cli cache ...`, or `accelerate launch`) the
first process prepares the folder (or finds it complete, or resumes it) and tells the others which
shards are missing; the missing shards are dealt out round-robin, each process computes and writes
whole shards of its own, and once every process is done the first writes documents.npy and the
manifest. A shard's bytes depend only on its rows, so the cache is the one a single process writes,
and a build stopped on N processes resumes on any number.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mft_cache import __version__
from mft_cache.attention import check_packed_attention, packed_forward_kwargs
from mft_cache.config import check_finite, opt, to_dict
from mft_cache.distributed import cpu_launch, decide_on_main, leave_process_group_at_exit
from mft_cache.faults import fault_point
from mft_cache.folder_lock import FolderLock
from mft_cache.models import (backbone_and_head, check_head, check_seq_len, describe_model, load_config, load_model,
                              load_tokenizer, resolve_device, resolve_dtype, tokenizer_fingerprint, vocab_size_of,
                              weights_fingerprint)
from mft_cache.masks import BOS_PER_ROW, CONCAT
from mft_cache.rows import (DATA_FORMATS, DEFAULT_LONG_ROWS, LONG_ROWS, PACKINGS, DocumentStream, RowSpec, bos_rule,
                            data_fingerprint, spec_for)
from mft_cache.rows.chat import TRAIN_ON, template_fingerprint
from mft_cache.rows.ingest import FILES as INGEST_FILES
from mft_cache.rows.ingest import IngestedRows, ingest
from mft_cache.rows.ingest import read_info as read_ingest
from mft_cache.rows.spec import documents_note, packing_record
from mft_cache.storage import CacheMetadata, CacheWriter, Manifest, cache_schema, load_manifest
from mft_cache.storage.backends import formats
from mft_cache.storage.hub import check_online, dataset_card, push_folder
from mft_cache.storage.schema import LOGPROB_DTYPES, Field, encode_logprobs, row_bytes

from .teacher import auto_chunk_tokens, teach_batch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "assets/model"
DEFAULT_DATA = "assets/data/licenses_train.jsonl"


@dataclass(frozen=True)
class CacheConfig:
    # its fields in the order of their `--help` groups
    # -- data: the documents, and how rows are made of them
    data: str = opt(DEFAULT_DATA, "finetuning documents: .txt/.jsonl/.json/.parquet/.csv file or folder, "
                    "a save_to_disk folder, or a hub dataset id", group="data")
    text_field: str = opt("text", "field (column) holding the document text", group="data")
    data_format: str = opt("auto", "rows of --data: text, chat (a `messages` list of {role, content}, rendered with "
                           "the tokenizer's chat template) or prompt-completion (TRL's fields); auto: from the first "
                           "row's fields", choices=DATA_FORMATS, group="data")
    prompt_field: str = opt("prompt", "field holding the prompt of prompt-completion rows", group="data")
    completion_field: str = opt("completion", "field holding the completion of prompt-completion rows", group="data")
    train_on: str = opt("completion", "chat and prompt-completion rows: train on the completions (every assistant "
                        "turn) only, or on every token (text rows: every token)", choices=TRAIN_ON, group="data")
    packing: str = opt("auto", "document: whole documents per row, each attending only to itself (the default for "
                       "chat and prompt-completion; a text document longer than a row is cut into row-sized windows, "
                       "each starting with BOS where the tokenizer adds one); concat: documents concatenated and cut "
                       "into rows (the default for text)", choices=PACKINGS, group="data")
    long_rows: str = opt(DEFAULT_LONG_ROWS, "a conversation or prompt-completion row longer than --seq-len where "
                         "documents are packed whole: drop (leave it out; the count and the first ones are logged and "
                         "kept in the manifest), truncate (keep a conversation's longest prefix of whole turns that "
                         "fits and ends after an answer; a prompt-completion row is dropped) or refuse (stop, naming "
                         "the row); text documents are cut into windows instead; docs/CHAT.md", choices=LONG_ROWS,
                         group="data")
    split: str = opt("train", "split to read from a hub dataset or a DatasetDict", group="data")
    seq_len: int = opt(256, "tokens per packed sequence", group="data")
    max_sequences: int = opt(0, "cache only the first N packed sequences (0: all)", group="data")
    # -- teacher: the model whose predictions are cached, and where it runs
    model: str = opt(DEFAULT_MODEL, "teacher: a hub id or a local folder of a transformers causal LM", group="teacher")
    dtype: str = opt("auto", "teacher weights dtype: auto (bfloat16 on a GPU and on a CPU that computes bf16 natively, "
                     "MFT_CPU_BF16=0/1 overriding the detection; float32 elsewhere), float32, bfloat16, float16",
                     choices=("auto", "float32", "bfloat16", "float16"), group="teacher")
    device: str = opt("auto", "device: auto, cpu, cuda, cuda:1, mps", group="teacher")
    trust_remote_code: bool = opt(False, "allow the model's own code from the hub to run", group="teacher")
    # -- cache format: what the cache keeps of each position, and how it is stored
    top_k: int = opt(32, "teacher log-probs kept per position", group="cache format")
    format: str = opt("zarr", "storage backend", choices=formats, group="cache format")
    logprob_dtype: str = opt("float16", "storage of the top-k log-probs: float16, float32, or q8 (exact float32 top-1 "
                             "plus uint8 codes of the gaps below it, decoded on read; the smallest) "
                             "(the label log-prob is always float32)", choices=LOGPROB_DTYPES, group="cache format")
    shard_mb: float = opt(64.0, "bound on a shard's uncompressed size in MiB", group="cache format")
    # -- output: the cache folder, and the Hub
    out: str = opt("caches/demo", "cache folder to write", group="output")
    overwrite: bool = opt(False, "replace a finished cache in --out", group="output")
    push_to_hub: str = opt("", "then upload the finished cache to this Hub dataset repository (OWNER/NAME) with a "
                           "dataset card; `mft train --cache hf://OWNER/NAME` reads it back", group="output")
    # -- performance: memory and speed of the teacher's pass
    batch_size: int = opt(4, "sequences per teacher forward pass", group="performance")
    chunk_tokens: int = opt(0, "positions per output-head chunk (0: about 256 MiB of fp32 logits)", group="performance")

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {self.top_k}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (one input and one label), got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.shard_mb > 0:
            raise ValueError(f"--shard-mb must be positive, got {self.shard_mb}")
        if self.chunk_tokens < 0 or self.max_sequences < 0:
            raise ValueError("--chunk-tokens and --max-sequences must be >= 0")
        if self.long_rows not in LONG_ROWS:
            raise ValueError(f"--long-rows must be one of {', '.join(LONG_ROWS)}; got {self.long_rows!r}")
        check_finite(self)  # last: the range checks above say more, where they apply


class HostCopy:
    """Device-to-host copies of one batch's outputs that overlap with the next batch's compute: on a GPU
    into pinned memory with non_blocking=True, waited for (an event) only when the values are read."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], tokens: int):
        self.tokens, self.event = tokens, None
        if tensors[0].device.type == "cuda":
            self.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                              for t in tensors)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tuple(t.cpu() for t in tensors)

    def numpy(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [t.numpy() for t in self.host]


def process_state(device: torch.device):
    """Accelerate's view of this process: one of several under torchrun / accelerate launch, else alone.
    A process group is created only when the launcher started several processes (WORLD_SIZE > 1)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu_launch(device.type))
    if state.num_processes > 1:
        leave_process_group_at_exit()
    return state


@dataclass
class CacheJob:
    """Everything a build needs once the data is ingested, the teacher loaded and the folder checked."""

    cfg: CacheConfig
    spec: RowSpec  # how rows are made: the data's format, what is trained, the packing
    dist: object  # accelerate PartialState
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    rows: IngestedRows | None  # the ingested rows on disk (None when the cache is already complete)
    model: object  # the teacher, or None when the cache is already complete
    schema: tuple[Field, ...]
    identity: dict  # what determines the cache's bytes (the manifest's "config")
    writer: CacheWriter
    state: str  # "new", "resume" or "complete"
    done: set[int]  # shards already on disk
    rows_per_shard: int = 1
    lock: FolderLock | None = None  # on --out, held by the first process until the build ends

    @property
    def num_shards(self) -> int:
        return 0 if self.rows is None else math.ceil(self.rows.num_sequences / self.rows_per_shard)

    def release(self) -> None:
        """Let the folder go (idempotent): the build is finished, or stopped."""
        if self.lock is not None:
            self.lock.release()

    def shard_rows(self, i: int) -> range:
        return range(i * self.rows_per_shard, min(self.rows.num_sequences, (i + 1) * self.rows_per_shard))


def model_vocab(cfg: CacheConfig) -> int:
    """The teacher's vocabulary size from its config, refused where the cache could not describe the teacher (k, seq
    len). The weights are not read: a finished cache is answered without them."""
    config = load_config(cfg.model, cfg.trust_remote_code)
    vocab = int(config.get_text_config().vocab_size)
    if cfg.top_k > vocab:
        raise ValueError(f"--top-k {cfg.top_k} exceeds the model's vocabulary size {vocab}")
    check_seq_len(config, cfg.seq_len)
    return vocab


def check_rows(cfg: CacheConfig, rows: IngestedRows, vocab: int) -> None:
    """The ingested rows, refused where the teacher could not read them."""
    log.info("data: %d documents -> %d sequences of %d tokens (%d label positions)",
             rows.info["num_documents"], rows.num_sequences, cfg.seq_len, rows.num_predictions)
    if rows.num_predictions == 0:
        raise ValueError(f"--data {cfg.data}: the documents hold fewer than 2 tokens in all")
    if rows.info["max_token_id"] >= vocab:
        raise ValueError(f"--model {cfg.model}: the tokenizer produces ids beyond the model's vocabulary ({vocab})")


def load_teacher(cfg: CacheConfig, vocab: int, dtype: torch.dtype, device: torch.device):
    """The teacher in eval mode, its output layer checked against the vocabulary size its config gave."""
    model = load_model(cfg.model, dtype, device, cfg.trust_remote_code)
    model.eval()
    if vocab_size_of(model) != vocab:
        raise ValueError(f"--model {cfg.model}: its output layer has {vocab_size_of(model)} rows but its config says "
                         f"vocab_size {vocab}")
    return model


def open_job(cfg: CacheConfig) -> CacheJob:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    dist = process_state(device)
    if dist.num_processes > 1:
        if device.type != "cpu" and device.index is None:
            device = dist.device  # this process's own GPU (cuda:LOCAL_RANK)
        if not dist.is_main_process:  # one log, from the first process
            logging.getLogger("mft_cache").setLevel(logging.WARNING)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    vocab = model_vocab(cfg)
    spec = row_spec(cfg)
    schema = cache_schema(vocab_size=vocab, top_k=cfg.top_k, seq_len=cfg.seq_len, logprob_dtype=cfg.logprob_dtype,
                          segments=spec.packing == "document")
    # recorded as resolved
    rows_options = ("data_format", "prompt_field", "completion_field", "train_on", "packing", "long_rows")
    identity = {k: v for k, v in to_dict(cfg).items()
                if k not in ("out", "overwrite", "device", "dtype", "push_to_hub", *rows_options)}
    identity.update(resolved_device=device.type, resolved_dtype=str(dtype).removeprefix("torch."),
                    data_fingerprint=None, weights_fingerprint=weights_fingerprint(cfg.model),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                    packing=CONCAT if bos_rule(tokenizer) is None else BOS_PER_ROW)
    identity.update(rows_identity(cfg, spec, tokenizer))  # nothing for plain text concatenated
    rows_per_shard = max(1, int(cfg.shard_mb * 2**20) // row_bytes(schema))
    writer, state, done, lock = _open_writer(cfg, spec, schema, identity, tokenizer, vocab, rows_per_shard, dist)
    rows = None if state == "complete" else IngestedRows(Path(cfg.out), read_ingest(cfg.out))
    model = None if state == "complete" else load_teacher(cfg, vocab, dtype, device)  # a finished cache needs none
    if model is not None and spec.packing == "document":
        check_packed_attention(model)  # refused before the pass if its documents would see each other
    return CacheJob(cfg, spec, dist, device, dtype, tokenizer, rows, model, schema, writer.identity, writer, state,
                     done, rows_per_shard=rows_per_shard, lock=lock)


def row_spec(cfg: CacheConfig) -> RowSpec:
    """How --data becomes rows: its format (forced, or read from its first row), what is trained, the packing."""
    return spec_for(cfg.data, cfg.seq_len, data_format=cfg.data_format, train_on=cfg.train_on, packing=cfg.packing,
                    text_field=cfg.text_field, split=cfg.split, prompt_field=cfg.prompt_field,
                    completion_field=cfg.completion_field, long_rows=cfg.long_rows)


def rows_identity(cfg: CacheConfig, spec: RowSpec, tokenizer) -> dict:
    """The identity's keys for rows other than plain text concatenated: how they are made (with documents packed
    whole, what becomes of one longer than a row), and the chat template that rendered them."""
    if spec.streamed_text:
        return {}
    out = {"packing": spec.packing, "data_format": spec.format, "train_on": spec.train_on}
    if spec.packing == "document":
        out["long_rows"] = spec.long_rows_rule  # "split" for text: cut into windows, whatever --long-rows says
    if spec.format != "text":
        out["chat_template_fingerprint"] = template_fingerprint(tokenizer)
    if spec.format == "prompt-completion":
        out.update(prompt_field=cfg.prompt_field, completion_field=cfg.completion_field)
    return out


def teach_shards(job: CacheJob) -> None:
    """The teacher's pass over this process's share of the missing shards; the writer thread writes shard i while
    the teacher computes shard i+1."""
    dist, rows = job.dist, job.rows
    if job.state == "resume":
        log.info("resuming: %d of %d shards already written", len([i for i in job.done if i < job.num_shards]),
                 job.num_shards)
    missing = [i for i in range(job.num_shards) if i not in job.done]
    mine = missing[dist.process_index::dist.num_processes]  # any process count can finish any build
    if dist.num_processes > 1:
        log.info("%d processes: %d shards to compute, about %d each", dist.num_processes, len(missing), len(mine))
    backbone, head = backbone_and_head(job.model)
    check_head(job.model, backbone, head, torch.as_tensor(rows.read(0, 1)[0], device=job.device))
    done_tokens = sum(rows.shard_tokens(i) for i in job.done if i < job.num_shards)
    bar = tqdm(total=rows.num_predictions, initial=done_tokens, unit="tok", unit_scale=True, desc="mft cache",
               dynamic_ncols=True, disable=not dist.is_main_process)

    def sync_bar() -> None:  # several processes: count every shard on disk, not only the first process's
        if dist.num_processes > 1 and not bar.disable:
            bar.n = max(bar.n, sum(rows.shard_tokens(i) for i in job.writer.recorded_shards() if i < job.num_shards))
            bar.refresh()

    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for i in mine:
            out = teach_shard(job, i, backbone, head, bar)
            if pending is not None:
                fault_point(f"cache:shard-{pending.result()['index']}")
                sync_bar()
            pending = pool.submit(lambda i=i, out=out: job.writer.write_shard(i, out))
        if pending is not None:
            fault_point(f"cache:shard-{pending.result()['index']}")
    dist.wait_for_everyone()  # every shard is on disk
    sync_bar()
    bar.close()


def teach_shard(job: CacheJob, i: int, backbone, head, bar) -> dict[str, np.ndarray]:
    """The stored fields of shard i: its rows and the teacher's values for them, encoded (a dtype cast, or q8) a batch
    at a time into arrays of the shard's size, so that a shard is held once, in its stored dtypes; at the trained
    positions only, and with documents packed whole, each document seen alone."""
    cfg, device = job.cfg, job.device
    rows = job.shard_rows(i)
    input_ids, lengths_np = job.rows.read(rows.start, rows.stop)  # from the ingested rows on disk
    id_np = np.dtype(job.schema[0].dtype)
    out = {"input_ids": input_ids.astype(id_np), "length": lengths_np}
    trained = job.rows.trained(rows.start, rows.stop)  # (n, T-1) bool
    segments = job.rows.segment_ids(rows.start, rows.stop)  # (n, T), documents packed whole only
    if segments is not None:
        out["segment_ids"] = segments.astype(next(f.dtype for f in job.schema if f.name == "segment_ids"))
    out["label_mask"] = trained.astype(np.uint8)
    starts = np.concatenate(([0], np.cumsum(trained.sum(axis=1)))).astype(np.int64)  # each row's first position
    size = int(starts[-1])
    chunk = cfg.chunk_tokens or auto_chunk_tokens(vocab_size_of(job.model))
    inflight = None  # the previous batch's device-to-host copy (overlapping this batch's compute) and its rows

    def collect(copy: HostCopy, b: int, e: int) -> None:
        top_ids, lp, label_lp = copy.numpy()
        encoded = {"topk_ids": top_ids.astype(id_np), "label_logprob": label_lp,
                   **encode_logprobs(lp, cfg.logprob_dtype)}  # per position: the same bytes as the whole shard's
        for name, values in encoded.items():
            if name not in out:
                out[name] = np.empty((size, *values.shape[1:]), dtype=values.dtype)
            out[name][starts[b]:starts[e]] = values
        bar.update(copy.tokens)

    for b in range(0, len(rows), cfg.batch_size):
        e = min(len(rows), b + cfg.batch_size)
        ids = torch.as_tensor(input_ids[b:e], device=device)
        lengths = torch.as_tensor(lengths_np[b:e], device=device, dtype=torch.long)
        valid = torch.as_tensor(trained[b:e], device=device)
        kwargs = None
        if segments is not None:  # the teacher sees each document alone, as the student will
            kwargs = packed_forward_kwargs(job.model, torch.as_tensor(segments[b:e], device=device))
        lp, top_ids, label_lp = teach_batch(backbone, head, ids, lengths, cfg.top_k, chunk, valid,
                                            forward_kwargs=kwargs)
        copy = HostCopy((top_ids, lp, label_lp), int(trained[b:e].sum()))
        if inflight is not None:
            collect(*inflight)
        inflight = (copy, b, e)
    if inflight is not None:
        collect(*inflight)
    return out


def finish_cache(job: CacheJob) -> Manifest:
    """documents.npy and the manifest (by the first process, once every shard is written); every process returns it."""
    cfg, dist = job.cfg, job.dist
    if not dist.is_main_process:
        dist.wait_for_everyone()  # the first process writes the manifest
        return load_manifest(cfg.out)
    manifest = job.writer.finish(metadata(job), job.num_shards, job.rows)
    job.release()
    dist.wait_for_everyone()
    return manifest


def metadata(job: CacheJob) -> CacheMetadata:
    import transformers

    cfg, rows, tokenizer, spec = job.cfg, job.rows, job.tokenizer, job.spec
    data = {"source": cfg.data, "text_field": cfg.text_field, "split": cfg.split,
            "fingerprint": rows.info["fingerprint"], "num_documents": rows.info["num_documents"],
            "num_empty_skipped": rows.info["num_empty"], "documents_note": documents_note(spec)}
    data.update(format=spec.format, train_on=spec.train_on)
    if "long_rows" in rows.info:  # documents packed whole: what became of those longer than a row
        data["long_rows"] = rows.info["long_rows"]
    data.update({k: v for k, v in job.identity.items()
                 if k in ("chat_template_fingerprint", "prompt_field", "completion_field")})
    return CacheMetadata(
        model={**describe_model(cfg.model, job.model, job.identity["weights_fingerprint"]),
               "dtype": str(job.dtype).removeprefix("torch.")},
        tokenizer={"fingerprint": job.identity["tokenizer_fingerprint"], "class": type(tokenizer).__name__,
                   "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vocab_size=vocab_size_of(job.model), top_k=cfg.top_k, seq_len=cfg.seq_len, logprob_dtype=cfg.logprob_dtype,
        data=data, packing=packing_record(spec, bos_rule(tokenizer) if spec.windowed_text else rows.bos_id),
        num_sequences=rows.num_sequences, num_tokens=rows.num_predictions,
        num_input_tokens=rows.info["num_input_tokens"], rows_per_shard=job.rows_per_shard,
        num_processes=job.dist.num_processes,
        created_by={"mft_cache": __version__, "torch": torch.__version__, "transformers": transformers.__version__})


def build_cache(cfg: CacheConfig) -> Manifest:
    """Build (or resume, or find complete) the cache described by `cfg`; return its manifest."""
    t0 = time.perf_counter()
    if cfg.push_to_hub:
        check_online("--push-to-hub", cfg.push_to_hub)  # before the teacher's pass, not after it
    job = open_job(cfg)
    try:
        if job.state == "complete":
            log.info("cache in %s is already complete (same configuration); nothing to do (--overwrite rebuilds it)",
                     cfg.out)
            manifest = load_manifest(cfg.out)
            push_cache(cfg, manifest, job.dist)
            return manifest
        teach_shards(job)
        manifest = finish_cache(job)
    finally:
        job.release()  # also when stopped (Ctrl-C, SIGTERM, an error): the next run takes the folder over
    push_cache(cfg, manifest, job.dist)
    n = job.dist.num_processes
    log.info("cache written to %s: %d sequences, %d tokens, %d shards, %.1f bytes/token, %.1f s%s",
             cfg.out, manifest.num_sequences, manifest.num_tokens, job.num_shards, manifest.bytes_per_token,
             time.perf_counter() - t0, f", {n} processes" if n > 1 else "")
    return manifest


def push_cache(cfg: CacheConfig, manifest: Manifest, dist) -> None:
    """--push-to-hub: the finished folder and its dataset card to the Hub (the first process)."""
    if cfg.push_to_hub and dist.is_main_process:
        url = push_folder(Path(cfg.out), cfg.push_to_hub, "dataset", "--push-to-hub",
                          card=dataset_card(manifest, cfg.push_to_hub))
        log.info("cache pushed to %s; train from it with --cache hf://%s", url, cfg.push_to_hub)


def _open_writer(cfg: CacheConfig, spec: RowSpec, schema, identity: dict, tokenizer, vocab: int, rows_per_shard: int,
                 dist) -> tuple[CacheWriter, str, set[int], FolderLock | None]:
    """(writer, folder state, indices of the shards already written, the folder's lock). The first process locks
    the folder (a second build on it stops here, naming this one's pid), checks it, reads the data (`ingest`) and
    then refuses, wipes or resumes the folder while the others wait; then all of them see its verdict and the
    data's fingerprint, and read the ingested rows from the folder."""
    prepared = {}

    def decide():
        lock = prepared["lock"] = FolderLock.acquire(Path(cfg.out))
        try:
            writer = prepared["writer"] = CacheWriter(cfg.out, fmt=cfg.format, schema=schema, identity=identity,
                                                      prepare=False, scratch=INGEST_FILES)
            writer.identity = {**identity,
                               "data_fingerprint": read_data(cfg, spec, writer, tokenizer, vocab, rows_per_shard)}
            writer.state = writer.prepare(cfg.overwrite)
        except BaseException:
            lock.release()
            raise
        return writer.state, sorted(writer.done_shards()), writer.identity["data_fingerprint"]

    state, done, fingerprint = decide_on_main(dist, decide)
    writer = prepared.get("writer") or CacheWriter(cfg.out, fmt=cfg.format, schema=schema,
                                                   identity={**identity, "data_fingerprint": fingerprint},
                                                   prepare=False, scratch=INGEST_FILES)
    return writer, state, set(done), prepared.get("lock")


def read_data(cfg: CacheConfig, spec: RowSpec, writer: CacheWriter, tokenizer, vocab: int, rows_per_shard: int) -> str:
    """The data's fingerprint, computed as the documents stream by. Where the folder holds a finished cache (and
    no --overwrite), the documents are only read: the fingerprint says whether it is this build's. Otherwise they
    are tokenized and packed into the folder's ingested rows (rows/ingest.py), reused from an earlier run of the
    same build where the source has not changed."""
    writer.check_folder()  # before reading anything: a foreign folder is refused at once
    options = dict(data_format=spec.format, prompt_field=cfg.prompt_field, completion_field=cfg.completion_field)
    if not cfg.overwrite and writer.finished_identity() is not None:
        return data_fingerprint(cfg.data, cfg.text_field, cfg.split, **options, progress=lambda docs: tqdm(
            docs, unit="doc", desc="mft cache: reading", dynamic_ncols=True, leave=False))
    stream = DocumentStream(cfg.data, cfg.text_field, cfg.split, **options)
    with tqdm(unit="tok", unit_scale=True, desc="mft cache: tokenizing", dynamic_ncols=True, leave=False) as bar:
        def progress(tokens: int) -> None:
            bar.update(tokens - bar.n)

        rows = ingest(Path(cfg.out), stream, tokenizer, seq_len=cfg.seq_len, id_dtype=schema_id_dtype(writer.schema),
                      rows_per_shard=rows_per_shard, max_sequences=cfg.max_sequences,
                      key={"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), **rows_identity(cfg, spec, tokenizer)},
                      progress=progress, spec=spec)
    check_rows(cfg, rows, vocab)
    return rows.info["fingerprint"]


def schema_id_dtype(schema) -> str:
    return np.dtype(schema[0].dtype).name
