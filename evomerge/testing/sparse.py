"""Header-only checkpoints of real shapes (tests, benchmarks): a config.json and safetensors files whose data region
is a hole (the header is written, then the file is extended to its full size), so a 7B model takes no disk.
Only readers of headers may touch them: every weight reads as zero. No torch."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from evomerge.io.headers import INDEX

ENTRY_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# Mistral-7B-v0.1's config.json (the fields the planner and transformers read)
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2,
}


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a Llama/Mistral checkpoint with this config (untied head, no biases)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    q = config["num_attention_heads"] * config.get("head_dim", h // config["num_attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_sparse_checkpoint(out: Path, config: dict, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16",
                            shard_bytes: int = 5 * 10**9) -> Path:
    """out/config.json, shards of at most shard_bytes of data (headers only, the rest a hole) and, when there
    are several, model.safetensors.index.json; returns out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": TORCH_NAMES[dtype]}, indent=1))
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * ENTRY_BYTES[dtype]
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard.items():
            n = math.prod(shape) * ENTRY_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
        with open(out / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + offset)  # the data: a hole, no disk
    if len(files) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return out


def disk_bytes(folder: Path) -> int:
    """Bytes a folder's files take on disk (holes excluded)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())
