#!/usr/bin/env python3
"""The tiny Qwen3 of examples/torch (no wshost module needed): both layouts give the
same logits after a correct copy and different ones after a wrong one, LoRA equals
its merged weights, the FSDP row shards cut as torch.chunk does, and a training step
changes exactly the parameters it should, on one rank and on two (gloo).

Run: /usr/bin/python3 tests/python/test_torch_models.py [-v]
With WSHOST set to the wshost binary, the engine names are also checked against
wshost's own layout of the same config.json."""

import os
import socket
import subprocess
import sys
import tempfile
import unittest

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except ImportError as e:  # CTest reads 77 as skipped
    print("test_torch_models: skipped, no torch for %s (%s)" % (sys.executable, e))
    sys.exit(77)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples", "torch"))

import tiny_qwen3 as tq  # noqa: E402

LORA_ALPHA = 8.0


def pair(tied, rank, lora_b_std=0.05, seed=0):
    cfg = tq.tiny_config(tied=tied)
    return (cfg, tq.TrainerModel(cfg, rank, LORA_ALPHA, seed=seed, lora_b_std=lora_b_std),
            tq.EngineModel(cfg, rank, LORA_ALPHA))


def logits(trainer, engine, tokens):
    with torch.no_grad():
        return trainer(tokens), engine.forward(tokens)


class Layout(unittest.TestCase):
    def test_every_engine_element_written_once(self):
        for tied in (False, True):
            for r in (0, 4):
                cfg = tq.tiny_config(tied=tied)
                shapes, dest = tq.engine_layout(cfg, r)
                rows = {n: [0] * s[0] for n, s in shapes}
                for name, shape in tq.hf_param_shapes(cfg) + [
                        (tq.PEFT_PREFIX + n, s) for n, s in tq.lora_param_shapes(cfg, r)]:
                    ename, first = dest[name]
                    eshape = dict(shapes)[ename]
                    self.assertEqual(tuple(eshape[1:]), tuple(shape[1:]), name)
                    for i in range(first, first + shape[0]):
                        rows[ename][i] += 1
                for n, count in rows.items():
                    self.assertEqual(set(count), {1}, "engine tensor %s rows written %s" % (n, set(count)))

    def test_lora_names(self):
        shapes, dest = tq.engine_layout(tq.tiny_config(), 4)
        self.assertEqual(dest["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"],
                         ("model.layers.1.self_attn.qkv_proj.lora_B.k_proj.weight", 0))
        self.assertEqual(dest["model.layers.0.mlp.up_proj.weight"],
                         ("model.layers.0.mlp.gate_up_proj.base_layer.weight", 129))
        self.assertEqual(dest["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"],
                         ("model.layers.0.mlp.down_proj.lora_A.weight", 0))
        _, dest0 = tq.engine_layout(tq.tiny_config(), 0)
        self.assertEqual(dest0["model.layers.0.self_attn.v_proj.weight"],
                         ("model.layers.0.self_attn.qkv_proj.weight", 96))

    @unittest.skipUnless(os.environ.get("WSHOST"), "WSHOST (the wshost binary) not set")
    def test_names_match_wshost(self):
        lua = ('local models=require("ws.models"); local lora=require("ws.lora")\n'
               'local spec=models.get(arg[1]); local r=tonumber(arg[2])\n'
               'local l=r>0 and lora.config{r=r,alpha=8,target_modules="all-linear"} or nil\n'
               'local lp=l and lora.params(spec,l) or {}\n'
               'local order,dest=models.family(spec).engine_layout(spec,models.params(spec),l,lp)\n'
               'for _,p in ipairs(models.params(spec)) do print("T",p.name,dest[p.name].name,dest[p.name].offset) end\n'
               'for _,p in ipairs(lp) do print("A",p.name,dest[p.name].name,dest[p.name].offset) end\n'
               'for _,t in ipairs(order) do print("E",t.name,table.concat(t.shape,"x")) end\n')
        with tempfile.TemporaryDirectory() as d:
            script = os.path.join(d, "names.lua")
            with open(script, "w") as f:
                f.write(lua)
            for tied in (False, True):
                cfg = tq.tiny_config(tied=tied)
                tq.write_config(cfg, os.path.join(d, "model"))
                for r in (0, 4):
                    got = subprocess.run([os.environ["WSHOST"], script, os.path.join(d, "model"), str(r)],
                                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
                    shapes, dest = tq.engine_layout(cfg, r)
                    want = []
                    for n, s in tq.hf_param_shapes(cfg):
                        want.append("T\t%s\t%s\t%d" % (n, dest[n][0], dest[n][1] * (s[1] if len(s) > 1 else 1)))
                    for n, s in tq.lora_param_shapes(cfg, r):
                        want.append("A\t%s%s\t%s\t0" % (tq.PEFT_PREFIX, n, dest[tq.PEFT_PREFIX + n][0]))
                    for n, s in shapes:
                        want.append("E\t%s\t%s" % (n, "x".join(map(str, s))))
                    self.assertEqual(got.splitlines(), want, "tied=%s r=%d" % (tied, r))


class FusedMatmul(unittest.TestCase):
    def test_row_split_of_one_matmul_equals_separate_matmuls(self):
        # What lets the engine's logits equal the trainer's bit for bit on the CPU.
        g = torch.Generator().manual_seed(3)
        old = torch.get_num_threads()
        try:
            for threads in sorted({1, max(1, os.cpu_count() or 1)}):
                torch.set_num_threads(threads)
                for t, h, outs in [(32, 64, (64, 32, 32)), (32, 64, (129, 129)), (7, 99, (64, 32, 32)),
                                   (16, 1024, (2048, 1024, 1024))]:
                    x = torch.randn(2, t, h, generator=g).to(tq.DTYPE)
                    parts = [torch.randn(o, h, generator=g).to(tq.DTYPE) for o in outs]
                    fused = torch.nn.functional.linear(x, torch.cat(parts)).split(list(outs), -1)
                    for y, w in zip(fused, parts):
                        self.assertTrue(torch.equal(y, torch.nn.functional.linear(x, w)),
                                        "threads %d shape %s" % (threads, (t, h, outs)))
        finally:
            torch.set_num_threads(old)


class Forward(unittest.TestCase):
    def test_engine_equals_trainer_after_reference_copy(self):
        for tied in (False, True):
            for r in (0, 4):
                cfg, trainer, engine = pair(tied, r)
                tokens = tq.fixed_tokens(cfg)
                for step in range(2):
                    nbytes = tq.copy_weights_reference(trainer, engine)
                    self.assertEqual(nbytes, engine.bytes())
                    a, b = logits(trainer, engine, tokens)
                    self.assertTrue(torch.equal(a, b), "tied=%s r=%d step %d: max diff %g"
                                    % (tied, r, step, tq.max_abs_diff(a, b)))
                    trainer.train_step(tokens)

    def test_wrong_rows_give_wrong_logits(self):
        cfg, trainer, engine = pair(False, 4)
        tokens = tq.fixed_tokens(cfg)
        tq.copy_weights_reference(trainer, engine)
        good, _ = logits(trainer, engine, tokens)
        qkv = engine.weights["model.layers.1.self_attn.qkv_proj.base_layer.weight"]
        k = qkv[64:96].clone()
        qkv[64:96].copy_(qkv[96:128])
        qkv[96:128].copy_(k)  # k and v rows swapped
        self.assertGreater(tq.max_abs_diff(good, engine.forward(tokens)), 1e-2)
        tq.copy_weights_reference(trainer, engine)
        a = engine.weights["model.layers.0.mlp.gate_up_proj.lora_A.gate_proj.weight"]
        b = engine.weights["model.layers.0.mlp.gate_up_proj.lora_A.up_proj.weight"]
        saved = a.clone()
        a.copy_(b)
        b.copy_(saved)  # gate and up adapters swapped
        self.assertGreater(tq.max_abs_diff(good, engine.forward(tokens)), 1e-2)

    def test_asleep_kv_cache_and_discarded_weights(self):
        cfg, trainer, engine = pair(False, 4)
        tokens = tq.fixed_tokens(cfg)
        tq.copy_weights_reference(trainer, engine)
        good, _ = logits(trainer, engine, tokens)
        engine.sleep(1)
        with self.assertRaises(RuntimeError):
            engine.forward(tokens)
        engine.wake("weights")
        engine.wake("kv_cache")
        self.assertTrue(torch.equal(engine.forward(tokens), good))
        engine.sleep(2)
        engine.wake("weights")
        engine.wake("kv_cache")
        self.assertTrue(torch.isnan(engine.forward(tokens)).all())
        tq.copy_weights_reference(trainer, engine)
        self.assertTrue(torch.equal(engine.forward(tokens), good))

    def test_lora_equals_merged_weights(self):
        cfg, trainer, _ = pair(False, 4, lora_b_std=0.2)
        tokens = tq.fixed_tokens(cfg)
        with torch.no_grad():
            w = trainer.full_weights()
            lora = trainer(tokens)
            merged = {}
            for name, t in w.items():
                if ".lora_" in name:
                    continue
                stem = name[: -len(".weight")]
                if stem + ".lora_A.weight" in w:
                    delta = w[stem + ".lora_B.weight"].float() @ w[stem + ".lora_A.weight"].float()
                    t = (t.float() + trainer.scaling * delta).to(t.dtype)
                merged[name] = t
            plain = tq.hf_forward(merged, cfg, tokens)
            base = tq.hf_forward({n: t for n, t in w.items() if ".lora_" not in n}, cfg, tokens)
        # bf16 rounds the merged weights and the two-step LoRA product differently:
        # within 5% of the logits' range, while the adapter itself moves them far more.
        scale = float(lora.float().abs().max())
        diff = tq.max_abs_diff(lora, plain)
        self.assertLess(diff, 0.05 * scale)
        self.assertGreater(tq.max_abs_diff(lora, base), 4 * diff)


class Shards(unittest.TestCase):
    def test_rows_as_torch_chunk(self):
        for rows in (1, 2, 3, 4, 7, 16, 64, 129, 257):
            for world in (1, 2, 3, 4, 8):
                t = torch.arange(rows * 3).reshape(rows, 3)
                chunks = list(torch.chunk(t, world))
                got = [tq.row_shard(t, world, r) for r in range(world)]
                for r in range(world):
                    want = chunks[r] if r < len(chunks) else t[rows:]
                    self.assertTrue(torch.equal(got[r], want), "rows %d world %d rank %d" % (rows, world, r))
                    self.assertTrue(got[r].is_contiguous())
                self.assertTrue(torch.equal(torch.cat(got), t))

    def test_shards_are_the_parameters(self):
        cfg = tq.tiny_config()
        full = tq.TrainerModel(cfg, 4, LORA_ALPHA)
        for rank in (0, 1):
            half = tq.TrainerModel(cfg, 4, LORA_ALPHA, world=2, rank=rank)
            for (n, p), (n2, q) in zip(half.named_parameters(), full.named_parameters()):
                self.assertEqual(n, n2)
                self.assertTrue(torch.equal(p, tq.row_shard(q.detach(), 2, rank)), n)
            self.assertEqual(half.global_shape("model.embed_tokens.weight"), (257, 64))
            self.assertEqual(half.base_params()["model.embed_tokens.weight"].shape[0], 129 - rank)


class Training(unittest.TestCase):
    def snapshot(self, trainer):
        return {n: p.detach().clone() for n, p in trainer.named_parameters()}

    def test_lora_trains_only_adapters(self):
        cfg = tq.tiny_config()
        trainer = tq.TrainerModel(cfg, 4, LORA_ALPHA)  # PEFT init: lora_B = 0
        tokens = tq.fixed_tokens(cfg)
        before = self.snapshot(trainer)
        trainer.train_step(tokens)
        after = self.snapshot(trainer)
        for n in before:
            changed = not torch.equal(before[n], after[n])
            if ".lora_B." in n:
                self.assertTrue(changed, n)
            else:  # base frozen; lora_A's gradient is zero while lora_B is
                self.assertFalse(changed, n)
        trainer.train_step(tokens)
        for n, p in trainer.named_parameters():
            if ".lora_A." in n:
                self.assertFalse(torch.equal(p.detach(), after[n]), n)
        self.assertEqual(len(trainer.adapter_params()), 2 * 7 * cfg["num_hidden_layers"])
        self.assertTrue(all(n.startswith("base_model.model.model.layers.") for n in trainer.adapter_params()))

    def test_full_training_changes_every_parameter(self):
        cfg = tq.tiny_config(tied=False)
        trainer = tq.TrainerModel(cfg, 0)
        tokens = tq.fixed_tokens(cfg)
        before = self.snapshot(trainer)
        ptrs = {n: p.data_ptr() for n, p in trainer.named_parameters()}
        losses = [trainer.train_step(tokens) for _ in range(3)]
        for n, p in trainer.named_parameters():
            self.assertFalse(torch.equal(before[n], p.detach()), n)
            self.assertEqual(p.data_ptr(), ptrs[n], "%s moved: a registered tensor must be updated in place" % n)
        self.assertLess(losses[-1], losses[0])
        self.assertEqual(list(trainer.base_params()), [n for n, _ in tq.hf_param_shapes(cfg)])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world2(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = tq.tiny_config()
    trainer = tq.TrainerModel(cfg, 4, LORA_ALPHA, world=2, rank=rank)
    tokens = tq.fixed_tokens(cfg, seed=100 + rank)  # each rank its own batch
    for _ in range(2):
        trainer.train_step(tokens)
    torch.save({n: p.detach() for n, p in trainer.named_parameters()},
               os.path.join(out_dir, "rank%d.pt" % rank))
    with torch.no_grad():
        full = trainer.full_weights()
        torch.save(trainer(tq.fixed_tokens(cfg), full), os.path.join(out_dir, "logits%d.pt" % rank))
    dist.destroy_process_group()


class TrainingWorld2(unittest.TestCase):
    def test_two_ranks_train_consistent_shards(self):
        cfg = tq.tiny_config()
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_world2, args=(_free_port(), d), nprocs=2, join=True)
            shards = [torch.load(os.path.join(d, "rank%d.pt" % r)) for r in (0, 1)]
            l0, l1 = (torch.load(os.path.join(d, "logits%d.pt" % r)) for r in (0, 1))
        self.assertTrue(torch.equal(l0, l1), "both ranks gather the same model")
        one = tq.TrainerModel(cfg, 4, LORA_ALPHA)
        init = dict(one.named_parameters())
        for n in shards[0]:
            full = torch.cat([shards[0][n], shards[1][n]])
            self.assertEqual(tuple(full.shape), one.global_shape(n))
            if ".lora_B." in n:
                self.assertFalse(torch.equal(full, init[n].detach()), n)
            elif ".lora_" not in n:
                self.assertTrue(torch.equal(full, init[n].detach()), n)
            with torch.no_grad():
                init[n].copy_(full)
        with torch.no_grad():
            self.assertTrue(torch.equal(one(tq.fixed_tokens(cfg)), l0))


if __name__ == "__main__":
    unittest.main()
