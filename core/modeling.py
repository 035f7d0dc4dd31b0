"""Models and tokenizers: load by hub id or path, or build the builtin tiny Llama; save in HF format.

Policies and the reference are `AutoModelForCausalLM`; the reward model and critic are
`AutoModelForSequenceClassification` with one label (a backbone plus a scalar `score` head), so every
checkpoint loads with plain transformers and the policies with vLLM as they are. The reward model's
normalising bias (reference summaries score 0 on average) lives in its config as `reward_bias`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from rayrlhf.core.config import LoraConfig, ModelConfig, cache_root

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- tokenizers -------------------------------------------------------------------------------------

def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the corpus, with a dedicated pad token distinct from EOS (detail 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=None, model_max_length=1 << 20)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Ensure an EOS and a pad token that is not EOS (padding with EOS would mask the real EOS)."""
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return prepare_tokenizer(AutoTokenizer.from_pretrained(name_or_path))


# --- models -----------------------------------------------------------------------------------------

def build_tiny_llama(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, attention_dropout=0.0,
    )
    return LlamaForCausalLM(config)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every model during RL (detail 4): PPO ratios must be 1 for unchanged weights.

    Besides `nn.Dropout` modules, some models call `F.dropout` with a float they keep on the module or read from
    the config (OPT: `self.dropout = config.dropout`, 0.1 for facebook/opt-350m; layerdrop skips whole layers):
    those are zeroed too."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop"):
                setattr(m, name, 0.0)
        config = getattr(m, "config", None)
        for name, value in (list(vars(config).items()) if config is not None else []):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop") and not name.startswith("_"):
                setattr(config, name, 0.0)


def _fit_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(path: str, tokenizer: PreTrainedTokenizerBase, dtype: str = "float32") -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    _fit_vocab(model, tokenizer)
    return model


def load_scalar_model(path: str, tokenizer: PreTrainedTokenizerBase, dtype: str = "float32",
                      init_head: bool = False) -> PreTrainedModel:
    """Backbone + scalar head. `init_head`: a fresh head with std 1/sqrt(d+1) (detail 7), e.g. from SFT."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])
    _fit_vocab(model, tokenizer)
    if init_head:
        d = model.score.weight.shape[1]
        nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(d + 1))
        model.config.reward_bias = 0.0
    return model


def gguf_cache_root() -> Path:
    """Where converted GGUF models are kept between runs: $RAYRLHF_CACHE/gguf, else ~/.cache/rayrlhf/gguf."""
    return cache_root() / "gguf"


def convert_gguf(folder: str, file: str, out: Path) -> Path:
    """A GGUF checkpoint as a Hugging Face folder (safetensors + tokenizer) at `out`, converted once.

    transformers dequantizes GGUF weights to float when it loads them, but refuses to save such a model
    ("quantized ... not serializable"): the weights go into a model built from the same config without the
    quantization marker, which saves as a normal folder that every role, vLLM and `from_pretrained` load.
    The conversion (a minute for SmolLM2-135M on 2 cores) is kept in `gguf_cache_root()` under the file's
    content hash, so a later run of the same file only links (or copies) it into `out`."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    import hashlib

    source = Path(folder) / file
    with source.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    cached = gguf_cache_root() / f"{source.stem}-{digest}"
    if not (cached / "config.json").is_file():
        _convert_gguf(folder, file, cached)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # hard links: no second copy of the weights on disk
        shutil.copytree(cached, tmp, copy_function=os.link)
    except OSError:  # another file system
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(cached, tmp)
    os.replace(tmp, out)
    return out


def _convert_gguf(folder: str, file: str, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())  # e.g. lm_head.weight, tied to the embeddings
    if unexpected or [k for k in missing if k not in tied]:
        raise ValueError(f"{folder}/{file}: GGUF weights do not match the {type(model).__name__} they describe "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    # written aside, then renamed: a crash (or another process converting the same file) never leaves half a folder
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    log.info("converted %s/%s to %s (%d parameters)", folder, file, out, count_params(model))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_frozen(checkpoint: str, kind: Literal["causal_lm", "scalar"], dtype: str = "float32",
                device: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model for inference only (reference, reward scorer, rollout, evaluation): its tokenizer, the model in
    eval mode on `device` (default: the GPU if there is one) with dropout off, so every role scores alike."""
    tokenizer = load_tokenizer(checkpoint)
    load = load_causal_lm if kind == "causal_lm" else load_scalar_model
    model = load(checkpoint, tokenizer, dtype).to(device or default_device()).eval()
    disable_dropout(model)
    return model, tokenizer


def trainable(model: PreTrainedModel, cfg: ModelConfig, task_type: str) -> PreTrainedModel:
    """A model to train: gradient checkpointing as configured, then LoRA adapters as configured."""
    if cfg.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (LoRA) and with FSDP2, and gives the same gradients.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, cfg.lora, task_type)


def apply_lora(model: PreTrainedModel, cfg: LoraConfig | None, task_type: str) -> PreTrainedModel:
    """Wrap with peft LoRA adapters; the scalar head of a reward/value model stays fully trainable."""
    if cfg is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type=task_type, modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )
    # peft keeps the adapters in fp32 over a bf16/fp16 base (autocast_adapter_dtype); the trained copy of the
    # scalar head would stay in the base's dtype, where AdamW's small steps are lost: it trains in fp32 too.
    model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=True)
    from peft.utils import ModulesToSaveWrapper

    for wrapper in model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            for head in wrapper.modules_to_save.values():
                if next(head.parameters()).dtype != torch.float32:
                    head.float()
                    head.register_forward_pre_hook(lambda _, args: tuple(a.float() for a in args))
    return model


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of a peft model's LoRA matrices (`lora_A`, `lora_B`), named as in the plain transformers
    model it wraps (`...q_proj.lora_A.default.weight`): what an adapter-only weight sync sends and loads. Any other
    trainable parameter (a fully trained module, a LoRA bias or magnitude) could not travel that way: ValueError."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in hf.named_parameters():
        if any(f".{m}." in name for m in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
            yield name, p
        elif p.requires_grad:
            raise ValueError(f"{name} trains beside the LoRA matrices: an adapter-only sync cannot carry it "
                             "(set rollout.lora_sync merged)")


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The plain transformers model, LoRA merged in, for saving and weight sync."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def save_checkpoint(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """save_pretrained (safetensors) + tokenizer, written aside then renamed: a crash leaves the old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if old.exists() and not path.exists():  # a crash between the two renames below: the old one is whole
        os.replace(old, path)
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
