#!/usr/bin/env python3
"""peer_torch.py: the PyTorch reference for wshost's weight sync.

Runs the sync the way verl's FSDP workers do it: every trainer parameter is a
flat FSDP shard (padded, ceil(numel / world) elements per rank); a sync gathers
each parameter with one all_gather (what DTensor.full_tensor() does), drops the
padding and copies the full tensor into the engine's parameter, which is a
slice of vLLM's fused qkv_proj / gate_up_proj where applicable, converting to
bf16 on the way. The LoRA adapters (lora_A [r, in], lora_B [out, r]) are sent
the same way afterwards, into separate engine tensors.

Values and checksums are bit-compatible with wshost: trainer shards are filled
with ws_random_elem (host/core/dtype.h) and the checksum is the shard-composable sum
of ws_hash_elem(global index, raw bits) mod 2^64 over every engine tensor, so
bench/compare.lua can check that both sides wrote identical engine weights.

Usage:
  python3 bench/peer_torch.py --model qwen3-0.6b --world 2 --iters 5
  torchrun --nproc-per-node 2 bench/peer_torch.py --model tiny --device cuda
  python3 bench/peer_torch.py --spec spec.json   # shapes and seeds from wshost
Prints one JSON object (rank 0) on stdout; progress goes to stderr.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

MASK64 = (1 << 64) - 1


def _s64(v):
    """A uint64 constant as the int64 with the same bits (torch has no uint64)."""
    v &= MASK64
    return v - (1 << 64) if v >= (1 << 63) else v


GOLDEN = _s64(0x9E3779B97F4A7C15)
MIX_H = _s64(0xD6E8FEB86659FD93)
MIX_R1 = _s64(0xBF58476D1CE4E5B9)
MIX_R2 = _s64(0x94D049BB133111EB)

# Model shapes (HF Qwen3 names, weight shapes [out, in]); keep in step with
# lua/ws/models.lua.
MODELS = {
    "tiny": dict(hidden=99, layers=2, intermediate=257, heads=4, kv_heads=2, head_dim=16,
                 vocab=8191, tied=True),
    "qwen3-0.6b": dict(hidden=1024, layers=28, intermediate=3072, heads=16, kv_heads=8,
                       head_dim=128, vocab=151936, tied=True),
    "qwen3-1.7b": dict(hidden=2048, layers=28, intermediate=6144, heads=16, kv_heads=8,
                       head_dim=128, vocab=151936, tied=True),
    "qwen3-8b": dict(hidden=4096, layers=36, intermediate=12288, heads=32, kv_heads=8,
                     head_dim=128, vocab=151936, tied=False),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print("peer_torch:", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model spec

def build_spec(model, rank_lora):
    """Returns the spec dict bench/compare.lua would pass with --spec."""
    c = MODELS[model]
    h, inter, hd = c["hidden"], c["intermediate"], c["head_dim"]
    q_out, kv_out = c["heads"] * hd, c["kv_heads"] * hd
    base, engine, adapters = [], [], []

    def tensor(name, shape, fused=None, offset=0):
        base.append(dict(name=name, shape=shape, engine=fused or name, offset=offset))

    engine.append(dict(name="model.embed_tokens.weight", shape=[c["vocab"], h]))
    tensor("model.embed_tokens.weight", [c["vocab"], h])
    for i in range(c["layers"]):
        p = "model.layers.%d." % i
        qkv, gu = p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"
        for name, shape in [(p + "input_layernorm.weight", [h]),
                            (qkv, [q_out + 2 * kv_out, h]),
                            (p + "self_attn.o_proj.weight", [h, q_out]),
                            (p + "self_attn.q_norm.weight", [hd]),
                            (p + "self_attn.k_norm.weight", [hd]),
                            (p + "post_attention_layernorm.weight", [h]),
                            (gu, [2 * inter, h]),
                            (p + "mlp.down_proj.weight", [h, inter])]:
            engine.append(dict(name=name, shape=shape))
        tensor(p + "input_layernorm.weight", [h])
        tensor(p + "self_attn.q_proj.weight", [q_out, h], qkv, 0)
        tensor(p + "self_attn.k_proj.weight", [kv_out, h], qkv, q_out * h)
        tensor(p + "self_attn.v_proj.weight", [kv_out, h], qkv, (q_out + kv_out) * h)
        tensor(p + "self_attn.o_proj.weight", [h, q_out])
        tensor(p + "self_attn.q_norm.weight", [hd])
        tensor(p + "self_attn.k_norm.weight", [hd])
        tensor(p + "post_attention_layernorm.weight", [h])
        tensor(p + "mlp.gate_proj.weight", [inter, h], gu, 0)
        tensor(p + "mlp.up_proj.weight", [inter, h], gu, inter * h)
        tensor(p + "mlp.down_proj.weight", [h, inter])
        dims = {"q_proj": (q_out, h), "k_proj": (kv_out, h), "v_proj": (kv_out, h),
                "o_proj": (h, q_out), "gate_proj": (inter, h), "up_proj": (inter, h),
                "down_proj": (h, inter)}
        if rank_lora > 0:
            for t in LORA_TARGETS:
                out_f, in_f = dims[t]
                mod = p + ("self_attn." if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                           else "mlp.") + t
                adapters.append(dict(name=mod + ".lora_A.weight", shape=[rank_lora, in_f]))
                adapters.append(dict(name=mod + ".lora_B.weight", shape=[out_f, rank_lora]))
    tensor("model.norm.weight", [h])
    engine.append(dict(name="model.norm.weight", shape=[h]))
    if not c["tied"]:
        tensor("lm_head.weight", [c["vocab"], h])
        engine.append(dict(name="lm_head.weight", shape=[c["vocab"], h]))
    # Default seeds: the 1-based position in the trainer's list, like wshost's
    # bench scripts; a --spec file may carry other seeds.
    for i, t in enumerate(base + adapters):
        t.setdefault("seed", i + 1)
        t.setdefault("scale", 0.02)
    for a in adapters:
        a["engine"], a["offset"] = a["name"], 0
    engine += [dict(name=a["name"], shape=a["shape"]) for a in adapters]
    return dict(model=model, base=base, adapters=adapters, engine=engine)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------- bit-exact helpers (int64)

def _shr(x, k):
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def random_elems(seed, first, n, scale, device, chunk=1 << 20):
    """ws_random_elem(seed, first + i, scale) for i in [0, n), as float32."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    base = _s64(seed * 0xBF58476D1CE4E5B9 + 0x9E3779B97F4A7C15)  # wraps like uint64
    sc = torch.tensor(scale, dtype=torch.float32, device=device)
    # In-place steps on two reused buffers: no allocation per chunk.
    z = torch.empty(min(chunk, n), dtype=torch.int64, device=device)
    t = torch.empty_like(z)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        zz, tt = z[:m], t[:m]
        torch.arange(first + s, first + s + m, dtype=torch.int64, device=device, out=zz)
        zz.add_(base)
        for k, mul in ((30, MIX_R1), (27, MIX_R2), (31, None)):
            torch.bitwise_right_shift(zz, k, out=tt).bitwise_and_((1 << (64 - k)) - 1)
            zz.bitwise_xor_(tt)
            if mul is not None:
                zz.mul_(mul)
        zz.bitwise_right_shift_(40).bitwise_and_((1 << 24) - 1).sub_(1 << 23)
        o = out[s:s + m]
        o.copy_(zz)
        o.mul_(1.0 / 8388608.0).mul_(sc)
    return out


def checksum(t, first=0, chunk=1 << 20):
    """Sum of ws_hash_elem(first + i, bits_i) mod 2^64 over a tensor's elements.
    The hashes are summed as two 32-bit halves so no int64 sum can overflow."""
    flat = t.reshape(-1)
    ibits = {torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float32: torch.int32}[flat.dtype]
    width_mask = (1 << (flat.element_size() * 8)) - 1
    total = 0
    x = torch.empty(min(chunk, flat.numel()), dtype=torch.int64, device=flat.device)
    y = torch.empty_like(x)
    for s in range(0, flat.numel(), chunk):
        m = min(chunk, flat.numel() - s)
        xx, yy = x[:m], y[:m]
        torch.arange(first + s, first + s + m, dtype=torch.int64, device=flat.device, out=yy)
        yy.mul_(GOLDEN)
        xx.copy_(flat[s:s + m].view(ibits)).bitwise_and_(width_mask).bitwise_xor_(yy)
        for mul in (MIX_H, MIX_H, None):
            torch.bitwise_right_shift(xx, 32, out=yy).bitwise_and_(0xFFFFFFFF)
            xx.bitwise_xor_(yy)
            if mul is not None:
                xx.mul_(mul)
        hi = int(torch.bitwise_right_shift(xx, 32, out=yy).bitwise_and_(0xFFFFFFFF).sum().item())
        lo = int(xx.bitwise_and_(0xFFFFFFFF).sum().item())
        total = (total + lo + (hi << 32)) & MASK64
    return total


# --------------------------------------------------------------- the sync

class Peer:
    def __init__(self, spec, rank, world, device, trainer_dtype):
        self.rank, self.world, self.device = rank, world, device
        self.base, self.adapters = spec["base"], spec["adapters"]
        # Engine parameters are allocated once, as the inference engine does.
        self.engine = {e["name"]: torch.empty(e["shape"], dtype=torch.bfloat16, device=device)
                       for e in spec["engine"]}
        self.shards = {}
        self.targets = {}
        for t in self.base + self.adapters:
            n = numel(t["shape"])
            shard = -(-n // world)
            first = rank * shard
            have = max(0, min(n, first + shard) - first)
            local = torch.zeros(shard, dtype=trainer_dtype, device=device)
            if have:
                local[:have] = random_elems(t["seed"], first, have, t["scale"], device)
            self.shards[t["name"]] = local
            dst = self.engine[t["engine"]].view(-1)[t["offset"]:t["offset"] + n]
            self.targets[t["name"]] = dst.view(t["shape"])
        self.gather_into_tensor = world > 1 and hasattr(dist, "all_gather_into_tensor")

    def full_tensor(self, name, shape):
        """DTensor.full_tensor() for a flat padded shard: gather, unpad, reshape."""
        local = self.shards[name]
        if self.world == 1:
            return local[:numel(shape)].view(shape)
        out = torch.empty(local.numel() * self.world, dtype=local.dtype, device=local.device)
        if self.gather_into_tensor:
            try:
                dist.all_gather_into_tensor(out, local)
            except (RuntimeError, NotImplementedError):
                # gloo in torch 1.13 has no _allgather_base: gather into views instead.
                self.gather_into_tensor = False
        if not self.gather_into_tensor:
            dist.all_gather(list(out.chunk(self.world)), local)
        return out[:numel(shape)].view(shape)

    def send(self, tensors):
        nbytes = 0
        for t in tensors:
            full = self.full_tensor(t["name"], t["shape"])
            dst = self.targets[t["name"]]
            dst.copy_(full)
            nbytes += dst.numel() * dst.element_size()
        return nbytes

    def engine_checksums(self):
        base_engines = {t["engine"] for t in self.base}
        base = adapter = 0
        for name, e in self.engine.items():
            c = checksum(e)
            if name in base_engines:
                base = (base + c) & MASK64
            else:
                adapter = (adapter + c) & MASK64
        return base, adapter


def _sync_point(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def run(rank, world, args, spec):
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    trainer_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.trainer_dtype]
    with torch.no_grad():
        t0 = time.perf_counter()
        peer = Peer(spec, rank, world, device, trainer_dtype)
        init_s = time.perf_counter() - t0
        sync_ms, base_ms, adapter_ms = [], [], []
        nbytes = 0
        for it in range(args.warmup + args.iters):
            _sync_point(device)
            t0 = time.perf_counter()
            nb = peer.send(peer.base)
            _sync_point(device)
            t1 = time.perf_counter()
            nb += peer.send(peer.adapters)
            _sync_point(device)
            t2 = time.perf_counter()
            if it >= args.warmup:
                sync_ms.append((t2 - t0) * 1e3)
                base_ms.append((t1 - t0) * 1e3)
                adapter_ms.append((t2 - t1) * 1e3)
                nbytes = nb
            if rank == 0:
                log("iter %d/%d %.1f ms" % (it + 1, args.warmup + args.iters, (t2 - t0) * 1e3))
        t0 = time.perf_counter()
        cs_base, cs_adapter = peer.engine_checksums()
        checksum_s = time.perf_counter() - t0
    if world > 1:
        dist.barrier()
    if rank == 0:
        result = dict(
            impl="torch", torch=torch.__version__, model=spec["model"], device=str(device),
            backend=("nccl" if device.type == "cuda" else "gloo") if world > 1 else "none",
            world=world, iters=args.iters, threads=torch.get_num_threads(),
            trainer_dtype=args.trainer_dtype,
            sync_ms_median=statistics.median(sync_ms), sync_ms_min=min(sync_ms),
            sync_ms_max=max(sync_ms), base_ms_median=statistics.median(base_ms),
            adapter_ms_median=statistics.median(adapter_ms), bytes_moved=nbytes,
            params=len(spec["base"]), adapters=len(spec["adapters"]),
            checksum="%016x" % ((cs_base + cs_adapter) & MASK64),
            checksum_base="%016x" % cs_base, checksum_adapter="%016x" % cs_adapter,
            init_s=init_s, checksum_s=checksum_s)
        text = json.dumps(result)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(text, flush=True)
    if world > 1:
        dist.destroy_process_group()


def _spawned(rank, world, args, spec):
    run(rank, world, args, spec)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--spec", help="JSON spec written by bench/compare.lua (overrides --model)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--world", type=int, default=None,
                    help="processes to spawn (default: WORLD_SIZE from torchrun, else 1)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--trainer-dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON result to this file")
    args = ap.parse_args()
    if args.spec:
        with open(args.spec) as f:
            spec = json.load(f)
    else:
        spec = build_spec(args.model, args.lora_rank)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, spec)
        return
    world = args.world or 1
    if world == 1:
        run(0, 1, args, spec)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch.multiprocessing as mp
    mp.spawn(_spawned, args=(world, args, spec), nprocs=world, join=True)


if __name__ == "__main__":
    main()
