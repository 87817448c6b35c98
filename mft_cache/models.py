"""Loading causal LMs and their tokenizers, splitting them into backbone + output head, fingerprints.

Shared by both stages (the teacher in stage one; the student, and the online teacher baseline, in
stage two). Logits are always computed as head(final hidden states) in chunks of positions, never
as one [batch, seq, vocab] tensor; `check_head` proves once per run that this equals the model's
own logits, so an architecture with an exotic output layer is refused instead of cached wrongly.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn as nn

from .names import REPO_ID_RULE, repo_id_problem, shown
from .provenance import read_provenance

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


# -- native bfloat16 --------------------------------------------------------------------------------
CPU_BF16_ENV = "MFT_CPU_BF16"  # "1" or "0": whether the CPU counts as computing bf16 natively, over the detection
X86_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
_X86 = ("x86_64", "amd64", "i386", "i686")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def apple_feat_bf16() -> bool:
    """Whether macOS reports the Arm BF16 extension (hw.optional.arm.FEAT_BF16: M2 and later; the M1 lacks it)."""
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "1"


@functools.cache
def detect_native_bf16() -> bool:
    """Whether this machine's CPU computes bfloat16 matmuls natively, as detected (once per process): an x86 CPU
    with AMX-BF16 or AVX512-BF16, or Apple silicon with FEAT_BF16. False elsewhere, where bf16 is emulated and
    slower than float32 (AVX2-only x86, the M1, other Arm CPUs)."""
    system, machine = platform.system(), platform.machine().lower()
    if system == "Darwin":
        return machine == "arm64" and apple_feat_bf16()
    if machine not in _X86:
        return False
    flags = cpu_flags()
    if flags:
        return bool(flags & X86_BF16_FLAGS)
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # no /proc/cpuinfo (Windows): torch's cpuinfo
    return bool(check and check())


def native_bf16() -> bool:
    """detect_native_bf16(), unless the environment variable MFT_CPU_BF16 says 1 (yes) or 0 (no)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={shown(forced)}: expected 1 (the CPU computes bf16 natively) or 0")
        return forced == "1"
    return detect_native_bf16()


def native_bf16_on(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it without emulation (Ampere and
    later), or a CPU for which native_bf16() holds. False on other devices (MPS among them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and native_bf16()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The teacher's dtype. `auto`: bfloat16 on a CUDA GPU and on a CPU with native bf16 (native_bf16), float32
    elsewhere."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and native_bf16())
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _local_folder(model_id: str) -> Path | None:
    p = Path(model_id).expanduser()
    return p if p.is_dir() else None


def _check_model_source(model_id: str) -> None:
    """A local path must be a model folder; anything else must be a Hub model id (NAME or OWNER/NAME)."""
    local = _local_folder(model_id)
    if local is None and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or Path(model_id).exists()):
        raise FileNotFoundError(f"--model {model_id}: no such folder")
    if local is not None and not (local / "config.json").exists():
        raise ValueError(f"--model {model_id}: the folder holds no config.json; expected a transformers model folder")
    problem = repo_id_problem(model_id, owner_optional=True) if local is None else None
    if problem is not None:
        raise ValueError(f"--model {shown(model_id)}: neither a local folder nor a Hub model id ({problem}); a Hub "
                         f"model id is NAME or {REPO_ID_RULE}")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    hf_logging.set_verbosity_error()


def _from_pretrained(auto_class, model_id: str, what: str, **kwargs):
    """auto_class.from_pretrained(model_id) after the source check, its errors one line naming --model and `what`."""
    _quiet_transformers()
    _check_model_source(model_id)
    try:
        return auto_class.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_id}: cannot {what} ({str(e).splitlines()[0][:300]})") from None


def load_tokenizer(model_id: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, model_id, "load a tokenizer", trust_remote_code=trust_remote_code)


def load_model(model_id: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, model_id, "load a causal LM", dtype=dtype,
                             trust_remote_code=trust_remote_code)
    return model.to(device)


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the output embedding: the size of the distribution the model predicts."""
    return int(model.get_output_embeddings().weight.shape[0])


def load_config(model_id: str, trust_remote_code: bool = False):
    """The model's config alone (no weights): enough to size a cache and to answer for a finished one."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model_id, "read its config", trust_remote_code=trust_remote_code)


def max_positions(config) -> int | None:
    """The longest sequence a model's config allows (None: unbounded or unknown)."""
    cfg = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(config, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse rows longer than the model's config allows (max_positions), naming `flag`: the model would fail on
    them, or read positions it was never trained on."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{flag} {seq_len} exceeds the model's maximum of {limit} positions")


def backbone_and_head(model: nn.Module):
    """(backbone, head): backbone(input_ids, attention_mask) -> final hidden states (B, T, H);
    head(h (N, H)) -> logits (N, V), including final logit soft-capping where the config has it."""
    backbone = model.get_decoder()
    lm_head = model.get_output_embeddings()
    if backbone is None or lm_head is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder and the output embedding")
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def head(h: torch.Tensor) -> torch.Tensor:
        logits = lm_head(h)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return backbone, head


def output_linear(model: nn.Module) -> tuple[nn.Linear | None, float | None]:
    """(linear, softcap): the output layer when it is a plain nn.Linear (tied or not) whose weight is
    an ordinary tensor, else None (a head the fused loss cannot read: fall back to backbone_and_head's
    callable); and the final logit soft-capping value, or None. head(h) = softcap·tanh(linear(h)/softcap)."""
    lm_head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None) or None
    # type(), not isinstance: subclasses (quantized layers) and sharded weights (FSDP2's DTensor,
    # gathered only by the module's own forward) keep the callable path.
    plain = type(lm_head) is nn.Linear and type(lm_head.weight) in (torch.Tensor, nn.Parameter)
    return (lm_head if plain else None), cap


def hidden_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  **kwargs) -> torch.Tensor:
    """The final hidden states (B, T, H). `kwargs`: more of the forward's arguments, e.g. the position ids that
    mft_cache.attention.packed_forward_kwargs gives with its attention_mask for documents packed whole."""
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state


@torch.no_grad()
def check_head(model: nn.Module, backbone: nn.Module, head, input_ids: torch.Tensor) -> None:
    """Refuse a model whose logits are not head(backbone(x)) (checked on a few positions, eval mode)."""
    was_training = model.training
    model.eval()
    x = input_ids[:1, : min(16, input_ids.shape[1])]
    ours = head(hidden_states(backbone, x, None)).float()
    theirs = model(input_ids=x, use_cache=False).logits.float()
    model.train(was_training)
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item() + 1e-6
    tol = 1e-4 if ours.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 2e-2
    if not err <= tol * scale:
        raise ValueError(
            f"{type(model).__name__}: its logits are not output_embedding(final hidden state) "
            f"(max difference {err:.3g}); this architecture's output layer is not supported"
        )


# -- fingerprints ----------------------------------------------------------------------------------
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation_autoset"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def config_fingerprint(model: nn.Module) -> str:
    d = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def model_files(model_id: str) -> Path | None:
    """The folder holding the model's files: the local folder, or its hub snapshot in the local cache."""
    local = _local_folder(model_id)
    if local:
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        return None


def weights_fingerprint(model_id: str) -> str | None:
    """sha256 over the weight files (names and bytes): independent of the dtype the model is loaded in."""
    folder = model_files(model_id)
    if folder is None:
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


_PROBE = "Hello world! Ünïcödé 日本語 1234 <code> def f(x): return x\n\n  tabs\tand  spaces"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what the tokenizer does: its vocabulary, special tokens, and the encoding of a probe text."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(map(str, tokenizer.all_special_tokens)),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "probe": list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"]),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def describe_model(model_id: str, model: nn.Module, weights_fp: str | None) -> dict:
    local = _local_folder(model_id)
    return {
        "id": model_id,
        "path": str(local.resolve()) if local else None,
        "architecture": type(model).__name__,
        "config_fingerprint": config_fingerprint(model),
        "weights_fingerprint": weights_fp,
        "tied_embeddings": bool(model.get_output_embeddings().weight is model.get_input_embeddings().weight),
        **({"trained_from": record} if (record := read_provenance(str(local)) if local else None) else {}),
    }
