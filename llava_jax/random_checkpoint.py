"""Deterministic random-weight LLaVA-NeXT checkpoints in the llava-hf layout, written without torch.

The one writer of random-weight checkpoints: used by the embedded default model (`default_model.py`), the
benchmark (`llava-jax bench --make-checkpoint`) and the converter's measurement script (`convert.measure`).
Each tensor is generated from a seed and its own name and written in row blocks straight into its safetensors
shard (the header is computed first from the shapes), so memory stays at one block whatever the model size,
and a tensor's values do not depend on which other tensors exist.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np

from .integrity import write_manifest
from .safetensors_io import file_parts

SHARD_BYTES = 2 << 30


def checkpoint_tensors(config: dict) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(llava-hf name, shape, init kind, scale) of every tensor of a LLaVA-NeXT `config`, in write order.

    Kinds: "normal" (scale * N(0, 1)), "norm" (1 + scale * N(0, 1)). Scales keep activations of order one:
    Linear weights 1/sqrt(fan_in), biases and norm jitter 0.1, embeddings 1; lm_head 3/sqrt(fan_in), peaked
    enough that greedy text is not one repeated token.
    """
    v, t = config["vision_config"], config["text_config"]
    vh, th = v["hidden_size"], t["hidden_size"]
    kv = th // t["num_attention_heads"] * t["num_key_value_heads"]
    out = []

    def linear(name, n_out, n_in, bias=True, gain=1.0):
        out.append((name + ".weight", (n_out, n_in), "normal", gain / math.sqrt(n_in)))
        if bias:
            out.append((name + ".bias", (n_out,), "normal", 0.1))

    def norm(name, n, bias=True):
        out.append((name + ".weight", (n,), "norm", 0.1))
        if bias:
            out.append((name + ".bias", (n,), "normal", 0.1))

    p, grid = v["patch_size"], v["image_size"] // v["patch_size"]
    pre = "model.vision_tower.vision_model."
    out.append((pre + "embeddings.patch_embedding.weight", (vh, 3, p, p), "normal", 1 / math.sqrt(3 * p * p)))
    out.append((pre + "embeddings.class_embedding", (vh,), "normal", 1.0))
    out.append((pre + "embeddings.position_embedding.weight", (grid * grid + 1, vh), "normal", 1.0))
    norm(pre + "pre_layrnorm", vh)
    for i in range(v["num_hidden_layers"]):
        lp = f"{pre}encoder.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(lp + "self_attn." + m, vh, vh)
        norm(lp + "layer_norm1", vh)
        norm(lp + "layer_norm2", vh)
        linear(lp + "mlp.fc1", v["intermediate_size"], vh)
        linear(lp + "mlp.fc2", vh, v["intermediate_size"])
    norm(pre + "post_layernorm", vh)
    linear("model.multi_modal_projector.linear_1", th, vh)
    linear("model.multi_modal_projector.linear_2", th, th)
    out.append(("model.image_newline", (th,), "normal", 1.0))
    pre = "model.language_model."
    out.append((pre + "embed_tokens.weight", (t["vocab_size"], th), "normal", 1.0))
    for i in range(t["num_hidden_layers"]):
        lp = f"{pre}layers.{i}."
        linear(lp + "self_attn.q_proj", th, th, bias=False)
        linear(lp + "self_attn.k_proj", kv, th, bias=False)
        linear(lp + "self_attn.v_proj", kv, th, bias=False)
        linear(lp + "self_attn.o_proj", th, th, bias=False)
        linear(lp + "mlp.gate_proj", t["intermediate_size"], th, bias=False)
        linear(lp + "mlp.up_proj", t["intermediate_size"], th, bias=False)
        linear(lp + "mlp.down_proj", th, t["intermediate_size"], bias=False)
        norm(lp + "input_layernorm", th, bias=False)
        norm(lp + "post_attention_layernorm", th, bias=False)
    norm(pre + "norm", th, bias=False)
    linear("lm_head", t["vocab_size"], th, bias=False, gain=3.0)
    return out


def _tensor_blocks(name: str, shape: tuple[int, ...], kind: str, scale: float, seed: int, np_dtype,
                   block_elems: int = 1 << 24):
    """The tensor's values in row blocks (bounded memory), from a generator seeded by (seed, name)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows = shape[0]
    row_elems = max(1, math.prod(shape[1:]))
    step = max(1, block_elems // row_elems)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = rng.standard_normal((n, *shape[1:]), np.float32) * np.float32(scale)
        if kind == "norm":
            block += np.float32(1.0)
        yield block.astype(np_dtype)


def write_random_checkpoint(path, config: dict, dtype: str = "float16", seed: int = 0,
                            shard_bytes: int = SHARD_BYTES, log=None) -> int:
    """Write `config.json` and the random weights of `config` (a llava-hf LLaVA-NeXT config dict) into `path`
    as safetensors, sharded with an index above `shard_bytes`, then `checksums.json` for every file in `path`
    (files written there before, e.g. a tokenizer, included; `integrity`). Returns the number of parameters."""
    from .dtypes import resolve_dtype, safetensors_code

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(resolve_dtype(dtype))
    st_dtype = safetensors_code(np_dtype)
    shards: list[list] = [[]]
    size = 0
    for t in checkpoint_tensors(config):
        nbytes = math.prod(t[1]) * np_dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    weight_map, total, params = {}, 0, 0
    started = time.perf_counter()
    for fname, shard in zip(names, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shp, _, _ in shard:
            nbytes = math.prod(shp) * np_dtype.itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
            params += math.prod(shp)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = path / f".{fname}.partial"
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shp, kind, scale in shard:
                for block in _tensor_blocks(name, shp, kind, scale, seed, np_dtype):
                    f.write(block.tobytes())
        os.replace(tmp, path / fname)
        total += offset
        if log:
            log(f"wrote {fname} ({offset / 1e9:.2f} GB) at {time.perf_counter() - started:.0f} s")
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps({**config, "dtype": dtype}, indent=2))
    write_manifest(str(path), lambda rel, size: file_parts(str(path / rel)) if rel.endswith(".safetensors")
                   else [(0, size, None)])
    return params
