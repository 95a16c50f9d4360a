"""tiny_qwen3.py: a tiny Qwen3-style decoder in plain PyTorch, in two layouts.

The same model twice, so that a weight sync between them can be checked by
running both:

* TrainerModel holds the parameters as Hugging Face's Qwen3ForCausalLM names
  them (model.layers.N.self_attn.q_proj.weight, ...), LoRA adapters as PEFT
  names them once `base_model.model.` is put in front
  (model.layers.N.self_attn.q_proj.lora_A.weight), and takes real optimizer
  steps. Under FSDP (world > 1) every parameter is this rank's dim-0 row shard
  (rows [r*ceil(R/W), min((r+1)*ceil(R/W), R)), as FSDP2's Shard(0) and
  torch.chunk cut them); the forward all-gathers them over torch.distributed.
* EngineModel holds vLLM's layout: q/k/v stacked into qkv_proj, gate/up into
  gate_up_proj, `.base_layer.weight` and `lora_A.q_proj.weight` under LoRA.
  Its forward multiplies by the fused tensors and splits the result, so
  weights written into the wrong rows give wrong logits.

Both forwards share every function except the projections and compute in
bf16. On the CPU (torch 1.13) one matmul by the fused [q;k;v] weight gives,
row by row, the same bits as three matmuls by the parts (each output element
reduces over the same input dimension in the same order); tests/python/
test_torch_models.py checks it. So the engine's logits equal the trainer's
bit for bit after a correct sync: the tolerance is 0. Another backend (a GPU
picks its kernel by shape) may differ in the last bf16 bit; the scripts take
--atol for that case.
"""

import json
import math
import os
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

ATTN_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEAR = ("gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ATTN_LINEAR + MLP_LINEAR  # target_modules = "all-linear"
# vLLM's fused modules: name -> the Hugging Face modules stacked along dim 0.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_OF = {part: fused for fused, parts in FUSED.items() for part in parts}
DTYPE = torch.bfloat16


# ------------------------------------------------------------------ config

def tiny_config(tied=False, **override):
    """A config.json table of a tiny Qwen3. Odd vocab and intermediate sizes make
    the row shards uneven on two ranks."""
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 129,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 257,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": bool(tied),
        "torch_dtype": "bfloat16",
    }
    cfg.update(override)
    return cfg


def write_config(cfg, directory):
    """Writes cfg as DIR/config.json (what wshost's model=DIR reads); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def linear_shapes(cfg):
    """[out, in] of each linear module of one layer."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv, i = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["intermediate_size"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def _block(module):
    return "self_attn" if module in ATTN_LINEAR else "mlp"


# ------------------------------------------------------------------ names

def hf_param_shapes(cfg):
    """(name, shape) of every base parameter in Qwen3ForCausalLM.state_dict() order."""
    h, hd, lin = cfg["hidden_size"], cfg["head_dim"], linear_shapes(cfg)
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % layer
        for m in ATTN_LINEAR:
            out.append((p + "self_attn.%s.weight" % m, lin[m]))
        out.append((p + "self_attn.q_norm.weight", (hd,)))
        out.append((p + "self_attn.k_norm.weight", (hd,)))
        for m in MLP_LINEAR:
            out.append((p + "mlp.%s.weight" % m, lin[m]))
        out.append((p + "input_layernorm.weight", (h,)))
        out.append((p + "post_attention_layernorm.weight", (h,)))
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return out


def lora_param_shapes(cfg, rank):
    """(module-relative name, shape) of every LoRA parameter: lora_A [r, in], lora_B [out, r].
    The PEFT name is PEFT_PREFIX + this name."""
    if rank <= 0:
        return []
    lin, out = linear_shapes(cfg), []
    for layer in range(cfg["num_hidden_layers"]):
        for m in LORA_TARGETS:
            stem = "model.layers.%d.%s.%s" % (layer, _block(m), m)
            out.append((stem + ".lora_A.weight", (rank, lin[m][1])))
            out.append((stem + ".lora_B.weight", (lin[m][0], rank)))
    return out


PEFT_PREFIX = "base_model.model."


def engine_layout(cfg, rank):
    """vLLM's tensors in wshost's order, and where each trainer/adapter tensor lands.

    Returns (shapes, dest): shapes is a list of (engine name, shape); dest maps a
    Hugging Face name or PEFT name to (engine name, first row)."""
    lin = linear_shapes(cfg)
    lora = rank > 0
    shapes, seen, dest = [], set(), {}

    def declare(name, shape):
        if name not in seen:
            seen.add(name)
            shapes.append((name, tuple(shape)))

    for name, shape in hf_param_shapes(cfg):
        module = name.split(".")[-2]
        if module in lin:
            fused = FUSED_OF.get(module)
            emod = fused or module
            stem = name[: -len(module + ".weight")] + emod
            ename = stem + (".base_layer.weight" if lora else ".weight")
            if fused:
                parts = FUSED[fused]
                rows = sum(lin[p][0] for p in parts)
                first = sum(lin[p][0] for p in parts[: parts.index(module)])
                declare(ename, (rows, shape[1]))
                dest[name] = (ename, first)
            else:
                declare(ename, shape)
                dest[name] = (ename, 0)
        else:
            declare(name, shape)
            dest[name] = (name, 0)
    for name, shape in lora_param_shapes(cfg, rank):
        parts = name.split(".")  # model layers N block module lora_X weight
        module, which = parts[-3], parts[-2]
        fused = FUSED_OF.get(module)
        stem = ".".join(parts[:-3] + [fused or module])
        ename = stem + "." + which + ("." + module if fused else "") + ".weight"
        declare(ename, shape)
        dest[PEFT_PREFIX + name] = (ename, 0)
    return shapes, dest


# ------------------------------------------------------------------ FSDP rows

def shard_rows(rows, world, rank):
    """[start, stop) of this rank's dim-0 shard: FSDP2 Shard(0), as torch.chunk cuts."""
    per = -(-rows // world)
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def row_shard(t, world, rank):
    """This rank's rows of t, as a contiguous tensor of its own."""
    start, stop = shard_rows(t.shape[0], world, rank)
    return t[start:stop].contiguous()


def gather_rows(shard, global_shape, world, group=None):
    """The full tensor from every rank's row shard (all_gather of padded shards)."""
    if world == 1:
        return shard
    rows = global_shape[0]
    per = -(-rows // world)
    rest = tuple(global_shape[1:])
    # gloo gathers float32 on every torch version; bf16 round-trips through it exactly.
    padded = torch.zeros((per,) + rest, dtype=torch.float32)  # on the CPU, for gloo
    padded[: shard.shape[0]].copy_(shard)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:rows].to(device=shard.device, dtype=shard.dtype)


# ------------------------------------------------------------------ shared math

def rms_norm(x, weight, eps):
    """Qwen3RMSNorm: normalize in float32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(cfg, length, dtype=DTYPE, device=None):
    hd = cfg["head_dim"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32,
                                                         device=device) / hd))
    freqs = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def lora_delta(x, a, b, scaling):
    """PEFT's LoRA term (dropout 0): scaling * B(A(x))."""
    return F.linear(F.linear(x, a), b) * scaling


def qk_heads(q, k, v, q_norm, k_norm, cfg, cos, sin):
    """Projections -> [batch, heads, seq, head_dim] after the per-head norms and RoPE."""
    b, t, _ = q.shape
    hd, eps = cfg["head_dim"], cfg["rms_norm_eps"]
    q = rms_norm(q.reshape(b, t, -1, hd).contiguous(), q_norm, eps).transpose(1, 2)
    k = rms_norm(k.reshape(b, t, -1, hd).contiguous(), k_norm, eps).transpose(1, 2)
    v = v.reshape(b, t, -1, hd).transpose(1, 2).contiguous()
    return apply_rope(q, cos, sin).contiguous(), apply_rope(k, cos, sin).contiguous(), v


def attend(q, k, v, cfg):
    """Grouped-query causal attention; q [b, H, t, d], k/v [b, KV, t, d] -> [b, t, H*d]."""
    rep = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    t = q.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (cfg["head_dim"] ** -0.5)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2).reshape(q.shape[0], t, -1)


def next_token_loss(logits, tokens):
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), tokens[:, 1:].reshape(-1))


def fixed_tokens(cfg, batch=2, length=16, seed=1234):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (batch, length), generator=g)


# ------------------------------------------------------------------ trainer

def init_full(cfg, lora_rank, seed=0, lora_b_std=0.0):
    """Deterministic full-size bf16 values of every base and LoRA parameter (every rank
    computes the same ones and keeps its rows)."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for name, shape in hf_param_shapes(cfg):
        if len(shape) == 1:  # norms: near 1, distinct per tensor
            val = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("embed_tokens.weight"):  # also the tied head: logits of a few units
            val = 0.5 * torch.randn(shape, generator=g)
        else:
            val = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        out[name] = val.to(DTYPE)
    for name, shape in lora_param_shapes(cfg, lora_rank):
        if ".lora_A." in name:
            val = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:  # PEFT starts lora_B at zero; tests may start it elsewhere
            val = torch.randn(shape, generator=g) * lora_b_std
        out[name] = val.to(DTYPE)
    return out


class TrainerModel(nn.Module):
    """Qwen3 in Hugging Face layout; named_parameters() yields HF names (LoRA: PEFT names
    without the `base_model.model.` prefix), each this rank's row shard."""

    def __init__(self, cfg, lora_rank=0, lora_alpha=16.0, seed=0, world=1, rank=0,
                 group=None, lora_b_std=0.0, lr=2e-3, device=None):
        super().__init__()
        self.cfg, self.lora_rank, self.world, self.rank, self.group = cfg, lora_rank, world, rank, group
        self.scaling = lora_alpha / lora_rank if lora_rank > 0 else 0.0
        self.global_shapes = OrderedDict()
        for name, full in init_full(cfg, lora_rank, seed, lora_b_std).items():
            self.global_shapes[name] = tuple(full.shape)
            trainable = ".lora_" in name or lora_rank == 0
            self._register(name, nn.Parameter(row_shard(full, world, rank).to(device),
                                              requires_grad=trainable))
        self.optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad],
                                           lr=lr, weight_decay=0.0)

    def _register(self, dotted, param):
        mod = self
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_parameter(parts[-1], param)

    def base_params(self):
        """Hugging Face name -> this rank's shard (the tensor itself: written in place)."""
        return OrderedDict((n, p) for n, p in self.named_parameters() if ".lora_" not in n)

    def adapter_params(self):
        """PEFT name -> this rank's shard."""
        return OrderedDict((PEFT_PREFIX + n, p) for n, p in self.named_parameters() if ".lora_" in n)

    def global_shape(self, name):
        return self.global_shapes[name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name]

    def full_weights(self):
        """Name -> full tensor. World 1: the parameters themselves; else gathered leaves
        whose .grad train_step scatters back to the shards."""
        out = OrderedDict()
        for name, p in self.named_parameters():
            if self.world == 1:
                out[name] = p
            else:
                with torch.no_grad():
                    full = gather_rows(p.detach(), self.global_shapes[name], self.world, self.group)
                out[name] = full.requires_grad_(p.requires_grad)
        return out

    def forward(self, tokens, weights=None):
        return hf_forward(weights if weights is not None else self.full_weights(), self.cfg,
                          tokens, self.scaling if self.lora_rank > 0 else None)

    def train_step(self, tokens):
        """One AdamW step on next-token cross-entropy; returns the loss (this rank's batch)."""
        weights = self.full_weights()
        loss = next_token_loss(hf_forward(weights, self.cfg, tokens,
                                          self.scaling if self.lora_rank > 0 else None), tokens)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            # All-reduce the full gradients, keep this rank's rows: every rank's
            # shards then take the step the whole batch asks for.
            for name, p in self.named_parameters():
                if not p.requires_grad:
                    continue
                g = weights[name].grad.float().cpu()  # gloo reduces on the CPU
                dist.all_reduce(g, group=self.group)
                g /= self.world
                start, stop = shard_rows(g.shape[0], self.world, self.rank)
                p.grad = g[start:stop].to(device=p.device, dtype=p.dtype).contiguous()
        self.optimizer.step()
        return float(loss.detach())


def hf_forward(w, cfg, tokens, scaling=None):
    """Logits of Qwen3ForCausalLM from Hugging Face names; scaling=None: no LoRA."""
    def linear(x, stem):
        y = F.linear(x, w[stem + ".weight"])
        if scaling is not None and (stem + ".lora_A.weight") in w:
            y = y + lora_delta(x, w[stem + ".lora_A.weight"], w[stem + ".lora_B.weight"], scaling)
        return y

    eps = cfg["rms_norm_eps"]
    cos, sin = rope_tables(cfg, tokens.shape[1], device=tokens.device)
    h = F.embedding(tokens, w["model.embed_tokens.weight"])
    for layer in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % layer
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q, k, v = (linear(x, p + "self_attn." + m) for m in ("q_proj", "k_proj", "v_proj"))
        q, k, v = qk_heads(q, k, v, w[p + "self_attn.q_norm.weight"],
                           w[p + "self_attn.k_norm.weight"], cfg, cos, sin)
        h = h + linear(attend(q, k, v, cfg), p + "self_attn.o_proj")
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        act = F.silu(linear(x, p + "mlp.gate_proj")) * linear(x, p + "mlp.up_proj")
        h = h + linear(act, p + "mlp.down_proj")
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return F.linear(h, head)


# ------------------------------------------------------------------ engine

def _torch_alloc(name, shape, dtype, device=None):
    return torch.empty(shape, dtype=dtype, device=device)


class EngineModel:
    """Qwen3 in vLLM's layout with its own forward and KV cache.

    alloc(name, shape, dtype) gives each weight's memory (default: torch.empty; the
    in-process example may pass wshost's pool). With own_memory, sleep/wake act as
    vLLM's allocator does on memory it owns: level 1 backs the weights up to a CPU
    copy and poisons the live ones with NaN, level 2 poisons them without a backup;
    the KV cache is dropped at sleep and made again at wake."""

    def __init__(self, cfg, lora_rank=0, lora_alpha=16.0, alloc=None, own_memory=True,
                 kv_batch=2, kv_len=16, device=None):
        self.cfg, self.lora_rank = cfg, lora_rank
        self.scaling = lora_alpha / lora_rank if lora_rank > 0 else None
        self.shapes, self.dest = engine_layout(cfg, lora_rank)
        self.device = device
        alloc = alloc or (lambda name, shape, dtype: _torch_alloc(name, shape, dtype, device))
        self.weights = OrderedDict()
        for name, shape in self.shapes:
            t = alloc(name, shape, DTYPE)
            if tuple(t.shape) != tuple(shape) or t.dtype != DTYPE:
                raise ValueError("engine tensor '%s': alloc gave %s %s, want %s %s"
                                 % (name, tuple(t.shape), t.dtype, tuple(shape), DTYPE))
            self.weights[name] = t
        self.own_memory = own_memory
        self.kv_shape = (cfg["num_hidden_layers"], 2, kv_batch, cfg["num_key_value_heads"],
                         kv_len, cfg["head_dim"])
        self.kv_cache = torch.zeros(self.kv_shape, dtype=DTYPE, device=self.device)
        self.backup = None
        self.asleep_level = 0

    # -- memory, as vLLM's sleep mode treats it
    def sleep(self, level):
        if self.own_memory:
            if level == 1:
                self.backup = OrderedDict((n, t.clone()) for n, t in self.weights.items())
            else:
                self.backup = None
            for t in self.weights.values():
                t.fill_(float("nan"))
        self.kv_cache = None
        self.asleep_level = level

    def wake(self, tags):
        tags = tags if isinstance(tags, (list, tuple)) else str(tags).replace(",", " ").split()
        if "weights" in tags and self.own_memory and self.backup is not None:
            for n, t in self.weights.items():
                t.copy_(self.backup[n])
            self.backup = None
        if "kv_cache" in tags and self.kv_cache is None:
            self.kv_cache = torch.zeros(self.kv_shape, dtype=DTYPE, device=self.device)
        if "weights" in tags:
            self.asleep_level = 0

    def bytes(self):
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    # -- forward
    def forward(self, tokens):
        if self.kv_cache is None:
            raise RuntimeError("engine: rollout while the KV cache is asleep (wake kv_cache first)")
        cfg, w, eps = self.cfg, self.weights, self.cfg["rms_norm_eps"]
        lora = self.lora_rank > 0
        base = ".base_layer.weight" if lora else ".weight"
        lin = linear_shapes(cfg)
        b, t = tokens.shape
        if b > self.kv_shape[2] or t > self.kv_shape[4]:
            raise ValueError("engine: tokens %s exceed the KV cache %s" % (tuple(tokens.shape), self.kv_shape))
        cos, sin = rope_tables(cfg, t, device=tokens.device)

        def fused(x, stem, parts):
            out = F.linear(x, w[stem + base]).split([lin[m][0] for m in parts], dim=-1)
            if not lora:
                return out
            return [o + lora_delta(x, w[stem + ".lora_A.%s.weight" % m], w[stem + ".lora_B.%s.weight" % m],
                                   self.scaling) for o, m in zip(out, parts)]

        def single(x, stem):
            y = F.linear(x, w[stem + base])
            if lora:
                y = y + lora_delta(x, w[stem + ".lora_A.weight"], w[stem + ".lora_B.weight"], self.scaling)
            return y

        h = F.embedding(tokens, w["model.embed_tokens.weight"])
        for layer in range(cfg["num_hidden_layers"]):
            p = "model.layers.%d." % layer
            x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
            q, k, v = fused(x, p + "self_attn.qkv_proj", FUSED["qkv_proj"])
            q, k, v = qk_heads(q, k, v, w[p + "self_attn.q_norm.weight"],
                               w[p + "self_attn.k_norm.weight"], cfg, cos, sin)
            # Keys and values go through the cache, as a paged engine reads them back.
            self.kv_cache[layer, 0, :b, :, :t].copy_(k)
            self.kv_cache[layer, 1, :b, :, :t].copy_(v)
            k = self.kv_cache[layer, 0, :b, :, :t].contiguous()
            v = self.kv_cache[layer, 1, :b, :, :t].contiguous()
            h = h + single(attend(q, k, v, cfg), p + "self_attn.o_proj")
            x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = fused(x, p + "mlp.gate_up_proj", FUSED["gate_up_proj"])
            h = h + single(F.silu(gate) * up, p + "mlp.down_proj")
        h = rms_norm(h, w["model.norm.weight"], eps)
        head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
        return F.linear(h, head)


@torch.no_grad()
def copy_weights_reference(trainer, engine):
    """The sync done by hand: every trainer and adapter tensor (gathered to full size)
    copied into its rows of the engine tensor. Returns the bytes written."""
    nbytes = 0
    full = trainer.full_weights()
    for name, t in full.items():
        key = PEFT_PREFIX + name if ".lora_" in name else name
        ename, first = engine.dest[key]
        engine.weights[ename][first:first + t.shape[0]].copy_(t.detach())
        nbytes += t.numel() * t.element_size()
    return nbytes


def max_abs_diff(a, b):
    """max |a - b| in float32; nan when either side holds a nan."""
    d = (a.float() - b.float()).abs()
    if torch.isnan(d).any():
        return float("nan")
    return float(d.max())


def device_of(kind, rank, who):
    """The torch device of a rank: "cpu", or GPU rank % count for "cuda" (made current).
    `who` names the script in the error when torch sees no GPU."""
    if kind == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("%s: --device cuda, but torch sees no GPU" % who)
    index = rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return "cuda:%d" % index
