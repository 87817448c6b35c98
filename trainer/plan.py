"""`mft plan` (and `mft train --plan`): the peak memory of a run, estimated before anything is trained, and what would make it fit.

What is estimated is the memory the run adds to a process that has imported torch, transformers and the trainer:
on CPU its resident set (the growth of ru_maxrss above that baseline), on CUDA what PyTorch's allocator hands out
(torch.cuda.max_memory_allocated). bench/memory_step.py measures exactly that quantity, and the benchmarks' memory
section prints the estimate beside each measurement.

The estimate is built from
- the parameters, counted on the meta device (`ModelShape`: no weights are read), with the adapter applied the way
  the run applies it;
- the activations, measured (`ActivationProfile`): a two-layer copy of the model (real widths, a 512-token
  vocabulary) runs a forward at two sequence lengths on the CPU while a saved-tensors hook adds up every tensor
  autograd keeps for the backward. That gives the bytes per token of one decoder layer, its part that grows with
  the sequence length (eager attention's T x T scores; none with sdpa), the same with activation checkpointing,
  and what lies outside the layers, for this architecture, dtype, adapter and autocast;
- a model of one step's phases (`estimate`): the peak is the largest of the forward with the loss, the start of
  the backward, and the end of the backward with the optimiser step; each adds up what is alive then.

The constants below that are not read off the model were measured with bench/memory_step.py on the CPU
(docs/MEMORY.md says how each was fitted); the memory section of the benchmarks re-checks them (estimate / measured)
on every run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from mft_cache.config import flag

from .config import MAX_SIZES, resolve_mixed_precision
from .optim import state_bytes

MB = 2**20
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_PROBE_LENGTHS = (32, 64)  # two sequence lengths: the per-token part and the T^2 part of the activations
_PROBE_VOCAB = 512

# -- constants measured on the CPU with bench/memory_step.py; how they were fitted: docs/MEMORY.md ----------------
# Resident memory a CPU run holds besides the tensors alive at its peak: a fixed part (the model's own modules, the
# cache reader imported on first use, the tokenizer) plus a share of the student's weights (what malloc keeps of
# blocks freed during a step, and the weight file's pages still mapped).
CPU_RUNTIME_BYTES = 40 * MB
CPU_RUNTIME_PER_WEIGHT_BYTE = 0.6
# The same under --cpu-allocator lean (every freed block above 1 MiB goes back to the system at once): what is left
# is the heap of small blocks and the runtime itself, about constant.
CPU_LEAN_RUNTIME_BYTES = 140 * MB
CPU_LEAN_RUNTIME_PER_WEIGHT_BYTE = 0.0
# The backward's working set while it walks the layers (the gradients of one layer's outputs and intermediates),
# as a multiple of one layer's saved activations.
BACKWARD_WORKING_LAYERS = 1.0
# transformers' own loss (--loss-impl transformers): the [B, T, V] float32 logits' log-softmax is kept for the
# backward, which then holds the loss's gradient and the log-softmax's gradient as well: 3 copies at its start.
TRANSFORMERS_LOGIT_COPIES = 3


@dataclass(frozen=True)
class ModelShape:
    """The parameters of the student as it trains, from its config alone."""

    weight_bytes: int  # every parameter (base in --base-dtype, the adapter in float32), tied weights once
    base_bytes: int  # the model without an adapter, in --base-dtype: what an online teacher holds
    file_bytes: int  # the weights as stored (their config's dtype): what loading reads
    trainable_shapes: tuple  # shapes of the trained parameters (float32)
    trainable: int  # their number of elements
    params: int  # every parameter's number of elements
    vocab: int
    hidden: int
    layers: int
    head_trained: bool  # the output layer is trained (full finetuning): the fused loss builds its gradient
    embedding_trained: bool  # the input embedding is trained (its gradient is one dense [V, H] tensor)
    softcap: bool = False  # the logits are soft-capped (Gemma 2): the fused loss keeps tanh(z/cap) beside them


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps for the backward, per token of a sequence (batch 1)."""

    per_layer: float  # one decoder layer, per token
    per_layer_quadratic: float  # one decoder layer, per token per token of the sequence (eager attention)
    per_layer_checkpointed: float  # one decoder layer under activation checkpointing (its input)
    fixed: float  # outside the layers (embedding, final norm), per token
    fixed_checkpointed: float
    hidden_dtype_bytes: int  # the final hidden states' element size


def loss_chunk_bytes(c: int, v: int, *, half: bool, softcap: bool, dense: bool) -> int:
    """The most bytes of (c, V) buffers the fused loss holds at once for one chunk of c positions.

    The chunk's float32 logits become their own gradient in place (4 bytes an entry). While the loss is computed,
    soft-capping keeps tanh(z/cap) for the chain rule (4 more) and a dense teacher the chunk's log-probabilities
    and probabilities (8 more). A half-precision matmul's output sits beside the float32 logits while they are
    made, and the gradient's cast beside them afterwards (2 more). One chunk is alive at a time.
    """
    during_loss = (4 if softcap else 0) + (8 if dense else 0)
    return c * v * (4 + max(during_loss, 2 if half else 0))


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _stored_dtype_bytes(config) -> int:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).removeprefix("torch.") if value is not None else "float32"
    return _DTYPE_BYTES.get(name, 4)


@contextlib.contextmanager
def _quiet():
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    peft_log = logging.getLogger("mft_cache.trainer.adapters")
    old = peft_log.level
    peft_log.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            peft_log.setLevel(old)


def _build(config, cfg, device: str, dtype: torch.dtype):
    """The student as the run builds it (checkpointing, adapter), on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    from .train import prepare_student

    config = copy.deepcopy(config)  # from_config may record what it builds in the config it is given
    with _quiet(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        model = model.to(dtype)  # the base as load_model gives it; the adapter is added after, in float32
        model.config.use_cache = False
        return prepare_student(cfg, model)


def model_shape(config, cfg) -> ModelShape:
    """The parameter counts of the run's student, instantiated on the meta device (nothing is allocated)."""
    from mft_cache.models import DTYPES

    dtype = DTYPES[cfg.base_dtype]
    stored = _stored_dtype_bytes(config)
    model = _build(config, cfg, "meta", dtype)
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    weight = sum(p.numel() * p.element_size() for p in params)
    base = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n
               and "ia3_" not in n and "magnitude" not in n) if cfg.peft != "none" else weight
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    text = _text_config(config)
    n = sum(p.numel() for p in params)
    adapter = sum(p.numel() for p in trained) if cfg.peft != "none" else 0
    return ModelShape(weight_bytes=weight, base_bytes=base, file_bytes=(n - adapter) * stored,
                      trainable_shapes=tuple(tuple(p.shape) for p in trained), trainable=sum(p.numel() for p in trained),
                      params=n, vocab=int(head.weight.shape[0]), hidden=int(head.weight.shape[1]),
                      layers=int(text.num_hidden_layers), head_trained=bool(head.weight.requires_grad),
                      embedding_trained=bool(embedding.weight.requires_grad),
                      softcap=bool(getattr(text, "final_logit_softcapping", None)))


def _saved_bytes(model, seq_len: int, autocast: torch.dtype | None) -> int:
    """Bytes of every tensor autograd saves in one training forward of a (1, seq_len) batch, parameters excluded."""
    from mft_cache.models import backbone_and_head, hidden_states

    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    backbone, _ = backbone_and_head(model)
    ids = torch.randint(0, _PROBE_VOCAB, (1, seq_len), generator=torch.Generator().manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    amp = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden_states(backbone, ids, torch.ones_like(ids))
    return sum(b for ptr, b in seen.items() if ptr not in weights)


def _probe_config(config, layers: int):
    probe = _text_config(config).__class__.from_dict(_text_config(config).to_dict())
    probe.num_hidden_layers = layers
    if getattr(probe, "layer_types", None):
        probe.layer_types = probe.layer_types[:layers]
    probe.vocab_size = _PROBE_VOCAB
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(probe, key, None), int) and getattr(probe, key) >= _PROBE_VOCAB:
            setattr(probe, key, 0)
    probe.architectures = getattr(_text_config(config), "architectures", None) or getattr(config, "architectures", None)
    return probe


def activation_profile(config, cfg) -> ActivationProfile:
    """Measure the activations of this architecture as the run trains it (see the module docstring)."""
    from dataclasses import replace

    from mft_cache.models import DTYPES

    try:  # the probe's values do not matter, only its shapes: skip the random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext

    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    dtype = DTYPES[cfg.base_dtype]

    def measure(checkpointing: bool) -> dict:
        run_cfg = replace(cfg, gradient_checkpointing=checkpointing)
        out = {}
        for layers in (1, 2):
            with no_init_weights():
                model = _build(_probe_config(config, layers), run_cfg, "cpu", dtype)
            model.train()
            out[layers] = [_saved_bytes(model, t, autocast) for t in _PROBE_LENGTHS]
            del model
        t1, t2 = _PROBE_LENGTHS
        layer = [out[2][i] - out[1][i] for i in range(2)]  # bytes of the second layer at t1, t2
        # layer(t) = a t + b t^2, solved from the two lengths
        b = max(0.0, (layer[1] / t2 - layer[0] / t1) / (t2 - t1))
        a = layer[0] / t1 - b * t1
        fixed = (out[1][1] - layer[1]) / t2
        return {"a": a, "b": b, "fixed": fixed}

    with torch.random.fork_rng(), _quiet():
        full, ckpt = measure(False), measure(True)
    hidden_bytes = 2 if (autocast is not None or dtype != torch.float32) else 4
    return ActivationProfile(per_layer=full["a"], per_layer_quadratic=full["b"], per_layer_checkpointed=ckpt["a"],
                             fixed=full["fixed"], fixed_checkpointed=ckpt["fixed"], hidden_dtype_bytes=hidden_bytes)


def cache_row_bytes(seq_len: int, top_k: int, logprob_bytes: int = 2) -> int:
    """One training row as the trainer holds it in memory (data.Rows.batch: ids as int64)."""
    p = seq_len - 1
    return seq_len * 8 + 8 + p + (p * top_k * (8 + logprob_bytes) + p * 4 if top_k else 0)


def estimate(shape: ModelShape, acts: ActivationProfile, cfg, seq_len: int, device: str = "cpu",
             top_k: int = 0, logprob_bytes: int = 2) -> dict:
    """The peak memory of one process of the run `cfg`, in bytes, with its parts; a pure function.

    Args:
        shape, acts: model_shape and activation_profile of the run's student.
        cfg: the TrainConfig (batch size, accumulation, loss, adapter, optimiser, checkpointing, teacher).
        seq_len: tokens per row. device: "cpu" or "cuda" (what the optimiser step and loading cost differs).
        top_k, logprob_bytes: of the cache rows read (0 with the online teacher).
    Returns:
        {"weights", "gradients", "optimizer", "activations", "activations_with_checkpointing",
        "activations_without_checkpointing", "loss_chunk", "teacher", "cache_rows", "working", "runtime",
        "loading", "total", "peak_phase", "phases"}: bytes, "activations" being the one that applies.
    """
    b, t, v, h = cfg.batch_size, seq_len, shape.vocab, shape.hidden
    tokens = b * t
    n = b * (t - 1)  # positions with a label
    weights = shape.weight_bytes
    grads = 4 * shape.trainable
    optimizer = state_bytes(cfg.optimizer, list(shape.trainable_shapes))

    layer = acts.per_layer + acts.per_layer_quadratic * t  # bytes per token of one layer
    without = tokens * (shape.layers * layer + acts.fixed)
    # checkpointed: each layer's input, plus one layer recomputed at a time in the backward
    with_ckpt = tokens * (shape.layers * acts.per_layer_checkpointed + acts.fixed_checkpointed + layer)
    activations = with_ckpt if cfg.gradient_checkpointing else without
    working = BACKWARD_WORKING_LAYERS * tokens * layer

    # the output layer and the loss
    head_grad = 4 * v * h if shape.head_trained else 0
    dense = cfg.teacher == "online" and cfg.objective != "ft"
    if cfg.loss_impl == "transformers":
        chunk = TRANSFORMERS_LOGIT_COPIES * 4 * tokens * v
        loss_forward, loss_backward = chunk, chunk
    else:
        chunk = loss_chunk_bytes(min(cfg.chunk_size, n), v, half=acts.hidden_dtype_bytes == 2,
                                 softcap=shape.softcap, dense=dense)
        dh = n * h * acts.hidden_dtype_bytes
        # forward: dL/dW of the head (float32, when trained) and dL/dh are built chunk by chunk; the backward
        # scales both into new tensors before the saved ones are freed
        loss_forward = chunk + head_grad + dh
        loss_backward = 2 * (head_grad + dh)

    # the online teacher: its weights, its [B, T, V] logits and their log-softmax (the targets, held through the
    # student's forward with every objective but ft)
    teacher_weights = shape.base_bytes if dense else 0  # plain finetuning on raw documents loads no teacher
    teacher_logits = 4 * tokens * v if cfg.teacher == "online" and cfg.objective != "ft" else 0
    rows_in_flight = 4 * b * cfg.grad_accum  # the Prefetcher: 2 queued steps, one being read, one training
    rows = rows_in_flight * cache_row_bytes(t, top_k, logprob_bytes)
    runtime = cpu_runtime(weights, getattr(cfg, "cpu_allocator", "default")) if device == "cpu" else 0

    # the optimiser step's temporaries: on CUDA the foreach kernels make one float32 copy of every trained
    # parameter (AdamW's sqrt of the second moment, Adafactor's variance estimates); on the CPU the
    # per-tensor loop works on one parameter at a time, and AdamW's denominator (the sqrt, then its division) holds
    # two copies of the largest for a moment (measured with --cpu-allocator lean: Gemma 3's 671 MB embedding
    # adds 2 x 671 MB at the step)
    largest = max((math.prod(s) for s in shape.trainable_shapes), default=0)
    if cfg.optimizer in ("adamw", "adafactor"):
        copies = 2 if device == "cpu" and cfg.optimizer == "adamw" else 1
        step_temp = 4 * (shape.trainable if device == "cuda" else copies * largest)
    else:
        step_temp = 0
    embedding_grad = 4 * v * h if shape.embedding_trained else 0
    accumulated = grads if cfg.grad_accum > 1 else 0  # the gradients of earlier micro-batches

    base = weights + optimizer + teacher_weights + rows + runtime
    phases = {
        "teacher forward": base + accumulated + 2 * teacher_logits if teacher_logits else 0,
        "forward and loss": base + accumulated + activations + loss_forward + teacher_logits,
        "start of the backward": base + accumulated + activations + loss_backward + working,
        "optimiser step": base + grads + max(step_temp, embedding_grad),
    }
    loading = 0
    if device == "cpu" and shape.file_bytes != shape.base_bytes:
        # from_pretrained reads the stored weights (mapped from the file) while it casts them: both are resident
        # until it is done (measured: the peak after loading a float32 SmolLM2 in bfloat16 is exactly the two)
        loading = shape.file_bytes + shape.weight_bytes
        if teacher_weights:  # the online teacher is loaded the same way after the student, which stays resident
            loading = max(loading, shape.base_bytes + shape.file_bytes + teacher_weights)
        phases["loading"] = loading
    peak_phase = max(phases, key=phases.get)
    return {
        "weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
        "activations_with_checkpointing": with_ckpt, "activations_without_checkpointing": without,
        "loss_chunk": chunk, "loss_forward": loss_forward, "teacher": teacher_weights + teacher_logits,
        "cache_rows": rows, "working": working, "runtime": runtime, "loading": loading,
        "total": phases[peak_phase], "peak_phase": peak_phase, "phases": phases,
    }


def cpu_runtime(weight_bytes: int, allocator: str) -> float:
    """What a CPU process holds besides its live tensors, with glibc's default policy or --cpu-allocator lean."""
    default = CPU_RUNTIME_BYTES + CPU_RUNTIME_PER_WEIGHT_BYTE * weight_bytes
    if allocator == "lean":  # never more than the default keeps (a tiny model holds ~40 MB either way)
        return min(default, CPU_LEAN_RUNTIME_BYTES + CPU_LEAN_RUNTIME_PER_WEIGHT_BYTE * weight_bytes)
    return default


# -- the command: `mft train --plan` ----------------------------------------------------------------------------
def available_memory(device: str) -> tuple[int | None, str]:
    """(bytes free for this run, where the number comes from): CUDA's free memory, else the system's MemAvailable."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free), "free on the GPU (torch.cuda.mem_get_info)"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available (psutil)"
    except ImportError:
        return None, "unknown"


def _changes(cfg, device: str = "cpu") -> list[dict]:
    """Changes that lower the peak, cheapest first (in what they cost the run: nothing, speed, what is trained), each
    as the options it sets."""
    out = []
    if cfg.loss_impl != "transformers" and cfg.chunk_size > 256:
        out.append({"chunk_size": 256})
    if cfg.loss_impl == "transformers":
        out.append({"loss_impl": "fused"})
    if device == "cpu" and cfg.cpu_allocator != "lean":
        out.append({"cpu_allocator": "lean"})
    if not cfg.gradient_checkpointing:
        out.append({"gradient_checkpointing": True})
    b = max(1, cfg.batch_size // 2)
    if cfg.batch_size > 1 and cfg.grad_accum * cfg.batch_size // b <= MAX_SIZES["grad_accum"]:
        out.append({"batch_size": b, "grad_accum": cfg.grad_accum * cfg.batch_size // b})
    if cfg.optimizer in ("adamw", "sgd"):
        out.append({"optimizer": "adafactor"})
    if cfg.peft == "none":
        out.append({"peft": "lora"})
        out.append({"peft": "lora", "base_dtype": "bfloat16"})
        out.append({"peft": "lora", "base_dtype": "bfloat16", "gradient_checkpointing": True})
    elif cfg.base_dtype == "float32":
        out.append({"base_dtype": "bfloat16"})
    return out


def _flags(change: dict) -> str:
    """A change as the command line spells it: `--batch-size 2 --grad-accum 8`, `--gradient-checkpointing`."""
    return " ".join(flag(k) if v is True else f"{flag(k)} {v}" for k, v in change.items())


def plan(cfg) -> dict:
    """The estimate for the run `cfg` describes, the memory available, and what changes would make it fit.
    Reads the cache's manifest and the model's config; loads no weights, trains nothing, writes nothing."""
    from mft_cache.models import load_config

    from .inputs import open_training_rows

    training = open_training_rows(cfg)
    m = training.manifest
    top_k = (cfg.top_k or m.top_k) if m is not None else 0
    config = load_config(training.model_id, cfg.trust_remote_code)
    gpu = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    device = "cuda" if gpu is not None and gpu.type == "cuda" else "cpu"
    cfg = dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg.mixed_precision, torch.device(device)))
    free, free_source = available_memory(device)  # before the probe adds its own
    profiles: dict = {}

    def run_estimate(c) -> dict:
        key = (c.peft, c.base_dtype, c.mixed_precision, c.lora_rank, c.peft_targets)
        if key not in profiles:
            profiles[key] = (model_shape(config, c), activation_profile(config, c))
        shape, acts = profiles[key]
        return estimate(shape, acts, c, training.seq_len, device, top_k) | {"shape": dataclasses.asdict(shape)}

    est = run_estimate(cfg)
    changes = []
    for change in _changes(cfg, device):
        total = run_estimate(dataclasses.replace(cfg, **change))["total"]
        changes.append({"flags": _flags(change), "total": total, "fits": None if free is None else total <= free})
    shape = est.pop("shape")
    return {"model": training.model_id, "architecture": (getattr(config, "architectures", None) or ["?"])[0],
            "device": device, "seq_len": training.seq_len, "batch_size": cfg.batch_size, "top_k": top_k,
            "params": shape["params"], "trainable": shape["trainable"], "vocab": shape["vocab"],
            "estimate": est, "available": free, "available_source": free_source,
            "fits": None if free is None else est["total"] <= free, "changes": changes,
            "options": {k: getattr(cfg, k) for k in ("peft", "base_dtype", "optimizer", "gradient_checkpointing",
                                                     "cpu_allocator",
                                                     "loss_impl", "chunk_size", "mixed_precision", "teacher",
                                                     "objective", "grad_accum")}}


def _mb(x: float) -> str:
    return f"{x / MB:,.0f} MB"


def format_plan(p: dict) -> str:
    """The plan as the table `mft train --plan` prints."""
    e, o = p["estimate"], p["options"]
    ck = o["gradient_checkpointing"]
    dtype = o["base_dtype"] if o["peft"] != "none" else "float32"
    lines = [f"mft train --plan: {p['model']} ({p['architecture']}, {p['params'] / 1e6:,.1f}M parameters, "
             f"{p['trainable'] / 1e6:,.2f}M trained); micro-batch {p['batch_size']} x {p['seq_len']} tokens on "
             f"{p['device']}; estimated peak memory of one process",
             "",
             f"  {'weights (' + dtype + (' base, float32 adapter' if o['peft'] != 'none' else '') + ')':<64}"
             f"{_mb(e['weights']):>12}",
             f"  {'gradients (float32, trained parameters)':<64}{_mb(e['gradients']):>12}",
             f"  {'optimizer states (' + o['optimizer'] + ')':<64}{_mb(e['optimizer']):>12}",
             f"  {'activations without checkpointing' + ('' if ck else '  <- applies'):<64}"
             f"{_mb(e['activations_without_checkpointing']):>12}",
             f"  {'activations with --gradient-checkpointing' + ('  <- applies' if ck else ''):<64}"
             f"{_mb(e['activations_with_checkpointing']):>12}"]
    if o["loss_impl"] == "transformers":
        what = "loss: full [B, T, V] logits, their log-softmax and gradient (--loss-impl transformers)"
    else:
        what = f"loss: one chunk of logits (--chunk-size {o['chunk_size']}, vocabulary {p['vocab']:,})"
    lines.append(f"  {what:<64}{_mb(e['loss_chunk']):>12}")
    if o["teacher"] == "online":
        lines.append(f"  {'online teacher (weights, logits and log-probs)':<64}{_mb(e['teacher']):>12}")
    lines.append(f"  {'cache rows in flight (prefetch)':<64}{_mb(e['cache_rows']):>12}")
    lines.append(f"  {'backward working memory (one layer)':<64}{_mb(e['working']):>12}")
    if e["runtime"]:
        lines.append(f"  {'CPU runtime (model code, tokenizer, allocator)':<64}{_mb(e['runtime']):>12}")
    if e["loading"]:
        lines.append(f"  {'loading: the stored weights read while cast to ' + dtype:<64}{_mb(e['loading']):>12}")
    lines += ["", f"  peak {_mb(e['total'])}, during the {e['peak_phase']} (the parts alive then; not a sum of every "
                  "line above)"]
    if p["available"] is None:
        lines.append("  available memory: unknown on this system")
    else:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"  available: {_mb(p['available'])} ({p['available_source']}): {verdict} "
                     f"({100 * e['total'] / p['available']:.0f}% of it)")
    if p["device"] == "cpu" and o["cpu_allocator"] == "lean":
        lines.append("  (CPU, --cpu-allocator lean: every freed block above 1 MiB goes back to the system, so the "
                     "process holds about what its tensors need)")
    elif p["device"] == "cpu":
        lines.append("  (CPU, glibc's default allocator: the process can keep memory a step freed, more so with more "
                     "tokens per micro-batch and with checkpointing, up to 2.3x this estimate measured; "
                     "--cpu-allocator lean gives it back, for more time per step: docs/MEMORY.md)")
    if p["changes"]:
        lines += ["", "  changes, cheapest first, and the peak each gives (the rest of the command as it is):"]
        for c in p["changes"]:
            mark = "" if c["fits"] is None else "  fits" if c["fits"] else "  does not fit"
            lines.append(f"    {c['flags']:<62}{_mb(c['total']):>12}{mark}")
    if not p["fits"] and p["fits"] is not None:
        fitting = [c["flags"] for c in p["changes"] if c["fits"]]
        lines += ["", f"  warning: the run is not expected to fit; the cheapest change that fits: {fitting[0]}"
                  if fitting else "  warning: the run is not expected to fit, nor with any single change listed; "
                  "combine them, or use a machine with more memory"]
    return "\n".join(lines)


def plan_json(p: dict) -> str:
    return json.dumps(p, indent=1, default=float)
