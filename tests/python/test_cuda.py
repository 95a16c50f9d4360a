"""The Python module on a GPU: DLPack with CUDA tensors and an in-process
session whose plans run on the GPU. Skipped (exit 77) where torch sees no GPU;
bench/gpu-check.sh runs it on a lent one.

Run: PYTHONPATH=build/python python3 tests/python/test_cuda.py
"""
import sys
import unittest

import torch

import wshost

if not torch.cuda.is_available():
    print("test_cuda: torch sees no GPU; skipped")
    sys.exit(77)


class CudaDLPackTest(unittest.TestCase):
    def test_round_trip_is_zero_copy(self):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "f32"),
                            (torch.int64, "i64")):
            x = torch.arange(24, device="cuda").to(dtype).reshape(4, 6)
            t = wshost.from_dlpack(x)
            self.assertEqual(t.data_ptr, x.data_ptr())
            self.assertEqual(t.device, "cuda:%d" % x.device.index)
            self.assertEqual(t.dtype, name)
            y = torch.from_dlpack(t)
            self.assertEqual(y.data_ptr(), x.data_ptr())
            self.assertEqual(y.device, x.device)
            self.assertTrue(torch.equal(y, x))


class CudaSessionTest(unittest.TestCase):
    def test_session_syncs_cuda_tensors(self):
        keep, trainer, engine = [], {}, {}
        with wshost.Session("pipelines/verl_lora.lua", model="tiny", device="cuda",
                            lora_rank=0, sleep_level=2, progress="off") as s:
            g = torch.Generator(device="cuda").manual_seed(0)
            for name, shape, _ in s.expected("trainer"):
                t = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
                trainer[name] = t
                s.register("trainer", name, t)
            for name, shape, _ in s.expected("engine"):
                t = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
                engine[name] = t
                s.register("engine", name, t)
            for step in (1, 2):
                rec = s.step()
                self.assertTrue(rec["verified"])
            keep.append(rec)
        torch.cuda.synchronize()
        # Unfused tensors equal the trainer's; the fused qkv_proj holds q, k, v in order.
        self.assertTrue(torch.equal(engine["model.norm.weight"], trainer["model.norm.weight"]))
        qkv = engine["model.layers.0.self_attn.qkv_proj.weight"]
        parts = [trainer["model.layers.0.self_attn.%s_proj.weight" % p] for p in "qkv"]
        self.assertTrue(torch.equal(qkv, torch.cat(parts)))


if __name__ == "__main__":
    unittest.main(verbosity=2)
