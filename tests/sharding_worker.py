"""Runs in a subprocess of test_sharding.py with 8 simulated CPU devices (XLA_FLAGS set before jax is imported).

Usage: python sharding_worker.py KIND OUT.json, KIND "llava" or "llava_next" (the test runs both at once, one
process per core). It builds one random checkpoint with GQA (8 heads, 2 kv heads: the kv heads divide neither a
model axis of 4 nor of 8), loads it on one device and on meshes 1x8, 2x4, 4x2, 8x1 (data x model), runs forward
and greedy generation on a batch of 3 rows (which divides no data axis > 1: padding is exercised), and records
logit differences, tokens, parameter/cache shardings and bytes per device. For LLaVA-1.5 also FSDP on 2x4 and the
serving slots (`slots.SlotEngine`) on 2x4; for
LLaVA-NeXT a converted (Orbax) checkpoint loaded onto 2x4, and the "auto" mesh. test_sharding.py asserts on the JSON.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: `convert`

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import llava_jax  # noqa: E402
from llava_jax import sharding  # noqa: E402

from builders import IMAGE_TOKEN, image_rows, random_pixels, randomize_, save, text_config, vision_config  # noqa: E402

MESHES = ["data=1,model=8", "data=2,model=4", "data=4,model=2", "data=8,model=1"]
NEW_TOKENS = 5
REPRESENTATIVE = {
    "q_proj": ("language_model", "layers", "q_proj", "weight"),
    "k_proj": ("language_model", "layers", "k_proj", "weight"),
    "o_proj": ("language_model", "layers", "o_proj", "weight"),
    "gate_proj": ("language_model", "layers", "gate_proj", "weight"),
    "down_proj": ("language_model", "layers", "down_proj", "weight"),
    "embed_tokens": ("language_model", "embed_tokens", "embedding"),
    "lm_head": ("language_model", "lm_head", "weight"),
    "norm": ("language_model", "layers", "input_layernorm", "scale"),
    "vision_q_proj": ("vision_tower", "layers", "q_proj", "weight"),
    "vision_fc1": ("vision_tower", "layers", "fc1", "weight"),
    "projector_1": ("multi_modal_projector", "linear_1", "weight"),
}


def build(kind, seed=5):
    """Like builders.build_llava(kind, "gqa") with 8 heads (2 kv heads) in both towers, so that every head axis but
    the kv heads divides a model axis of 8 and per-device bytes shrink all the way."""
    vc = vision_config(num_attention_heads=8)
    tc = text_config("gqa", num_attention_heads=8, num_key_value_heads=2)
    common = dict(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
    if kind == "llava":
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
    else:
        pinpoints = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
        model = transformers.LlavaNextForConditionalGeneration(
            transformers.LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
    randomize_(model, seed)
    return model.eval()


def leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def spec_list(spec) -> list:
    return [list(s) if isinstance(s, tuple) else s for s in spec]


def inputs(kind, model):
    if kind == "llava":
        n = model.config.tokens_per_crop
        ids, mask = image_rows([[3, ("img", 0), 4], [5], [2, ("img", 1), 2]], [n, n], seed=1)
        px = np.random.default_rng(0).standard_normal((2, 3, 56, 56)).astype(np.float32)
        return ids, mask, px, None
    sizes = [(40, 100), (50, 90)]  # one pinpoint (1x2 crops): one vision program per mesh
    plans = [model.plan_image(*s) for s in sizes]
    ids, mask = image_rows([[3, ("img", 0), 4], [5], [2, ("img", 1), 2]], [p.num_tokens for p in plans], seed=1)
    return ids, mask, random_pixels([p.num_crops for p in plans], seed=2), np.array(sizes)


def spy_decoder(model):
    """Record the decode state's layout at the first decode call, and whether the cache was donated."""
    seen, dec = {}, model.engine
    original = dec.decode

    def decode(params, state, *args):
        if not seen:
            seen.update(cache=spec_list(state.cache["k"].sharding.spec), batch=int(state.tokens.shape[0]),
                        kv_mask=spec_list(state.kv_mask.sharding.spec),
                        cache_shard=list(state.cache["k"].addressable_shards[0].data.shape),
                        cache_shape=list(state.cache["k"].shape))
        out = original(params, state, *args)
        seen.setdefault("donated", bool(state.cache["k"].is_deleted()))
        return out

    dec.decode = decode
    return seen


def run(model, ids, mask, px, sizes):
    logits = model.forward(ids, px, sizes, attention_mask=mask)
    tokens = model.generate_ids(ids, px, sizes, attention_mask=mask, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    return logits, tokens


def record(model, ref_logits, ref_tokens, ids, mask, px, sizes, spy=True):
    """Run `model` on the batch; its logits, tokens, layouts and memory against the single-device reference."""
    seen = spy_decoder(model) if spy else {}
    logits, tokens = run(model, ids, mask, px, sizes)
    valid = mask.astype(bool)
    per_device = sharding.device_bytes(model.params)
    return dict(
        max_diff=float(np.abs(logits - ref_logits)[valid].max()),
        logits_shape=list(logits.shape),
        tokens=tokens,
        tokens_equal=tokens == ref_tokens,
        specs={k: spec_list(leaf(model.params, p).sharding.spec) for k, p in REPRESENTATIVE.items()},
        max_device_bytes=max(per_device.values()),
        devices=len(per_device),
        batch_multiple=model.batch_multiple,
        state=seen,
    )


def restore_check(path, target_model, ids, mask, px, sizes, ref_logits, ref_tokens):
    """Convert the checkpoint (llava-jax-convert: an Orbax checkpoint), `load` it onto the 2x4 mesh (one Orbax
    restore with target shardings), and run the restored params through the 2x4 model's compiled programs (same
    shardings: no recompilation)."""
    from convert import convert

    converted = os.path.join(tempfile.mkdtemp(), "converted")
    convert(path, converted)
    loaded = llava_jax.load(converted, mesh=target_model.mesh)
    leaves = jax.tree_util.tree_leaves_with_path(loaded.params)
    wanted = dict(jax.tree_util.tree_leaves_with_path(target_model.param_shardings))
    wrong, whole, sharded = [], [], 0
    for p, arr in leaves:
        name = sharding.path_str(p)
        if arr.sharding != wanted[p]:
            wrong.append(name)
        expect = arr.sharding.shard_shape(arr.shape)
        if any(tuple(s.data.shape) != expect for s in arr.addressable_shards):
            whole.append(name)
        sharded += expect != arr.shape
    engine = target_model.engine  # (its decode is wrapped by spy_decoder: not a jitted function to count)
    programs = lambda: tuple(getattr(engine, name)._cache_size()  # noqa: E731
                             for name in ("embed", "insert_images", "logits", "prefill"))
    compiled = programs()
    target_model.params = loaded.params
    out = dict(wrong_sharding=wrong, shard_not_slice=whole, sharded_leaves=sharded, leaves=len(leaves),
               **record(target_model, ref_logits, ref_tokens, ids, mask, px, sizes, spy=False))
    out["recompiled"] = compiled != programs()
    return out


SLOT_ROWS = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13]]  # text prompts for the serving slots


def slot_tokens(model, rows=SLOT_ROWS, steps=NEW_TOKENS) -> list[list[int]]:
    """Greedy tokens of each prompt through the server's programs (`llava-jax serve --mesh`): each prefilled
    alone, inserted into its own slot of a 4-slot decode batch (slots over the data axis), then decoded together
    one step a call; no stop tokens."""
    from llava_jax.batch import left_pad, make_batch
    from llava_jax.engine import stop_id_array
    from llava_jax.sampling import make_sampler
    from llava_jax.slots import SlotEngine

    engine = model.engine
    slots = SlotEngine(engine, 4, 32, model.dtype, steps_per_call=1)
    state, out = slots.empty(), []
    for slot, row in enumerate(rows):
        ids, mask = left_pad([row], 8)
        batch = make_batch(ids, mask, [], model.config.image_token_id, engine.data_size)
        state, first = slots.admit(state, model.params, batch, slot, make_sampler(0.0), stop_id_array([]), steps, 0)
        out.append([int(np.asarray(first.tokens)[0, 0])])
    params = engine.params_for(model.params, "decode")
    for _ in range(steps - 1):
        state, tokens, _ = slots.step(params, state, np.int32(0))
        for slot, tokens_of_slot in enumerate(np.asarray(tokens)[: len(rows)]):
            out[slot] += tokens_of_slot.tolist()
    return out


def main(kind, out_path):
    t0, c0 = time.time(), time.process_time()
    torch.set_num_threads(1)
    path = save(build(kind), os.path.join(tempfile.mkdtemp(), "ckpt"))
    ref = llava_jax.load(path, mesh=None)
    ids, mask, px, sizes = inputs(kind, ref)
    ref_logits, ref_tokens = run(ref, ids, mask, px, sizes)
    single = sum(x.nbytes for x in jax.tree_util.tree_leaves(ref.params))
    entry = {"devices": jax.device_count(), "ref_tokens": ref_tokens, "single_device_bytes": single, "meshes": {},
             "rows": len(ids), "logit_std": float(ref_logits[mask.astype(bool)].std())}
    models = {}
    for m in MESHES:
        models[m] = llava_jax.load(path, mesh=m)
        entry["meshes"][m] = record(models[m], ref_logits, ref_tokens, ids, mask, px, sizes)
    if kind == "llava":  # the extra checks are split between the two workers (run in parallel) by cost
        fsdp = llava_jax.load(path, mesh="data=2,model=4", fsdp=True)
        entry["fsdp"] = record(fsdp, ref_logits, ref_tokens, ids, mask, px, sizes)
        entry["slots"] = {"alone": [ref.generate_ids(np.asarray([row]), max_new_tokens=NEW_TOKENS,
                                                     stop_token_ids=[])[0] for row in SLOT_ROWS],
                          "single": slot_tokens(ref), "data=2,model=4": slot_tokens(models["data=2,model=4"])}
    else:
        entry["restore"] = restore_check(path, models["data=2,model=4"], ids, mask, px, sizes, ref_logits,
                                         ref_tokens)
        entry["auto_mesh"] = dict(llava_jax.load(path).mesh.shape)  # mesh="auto" (the default)
    entry["seconds"], entry["cpu_seconds"] = time.time() - t0, time.process_time() - c0
    with open(out_path, "w") as f:
        json.dump(entry, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
