"""DLPack both ways between torch and wshost, zero copy (no session needed).

Run: PYTHONPATH=build/python /usr/bin/python3 tests/python/test_dlpack.py
"""
import gc
import sys
import unittest

import torch

import wshost

DTYPES = [
    (torch.float32, "f32"),
    (torch.bfloat16, "bf16"),
    (torch.float16, "f16"),
    (torch.uint8, "u8"),
    (torch.int32, "i32"),
    (torch.int64, "i64"),
]


def sample(dtype):
    if dtype.is_floating_point:
        return (torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7 - 1.5).to(dtype)
    return torch.arange(24, dtype=dtype).reshape(4, 6)


class DLPackTest(unittest.TestCase):
    def test_round_trip_every_dtype(self):
        for dtype, name in DTYPES:
            with self.subTest(dtype=name):
                x = sample(dtype)
                t = wshost.from_dlpack(x)
                self.assertEqual(t.dtype, name)
                self.assertEqual(t.shape, (4, 6))
                self.assertEqual(t.device, "cpu")
                self.assertEqual(t.data_ptr, x.data_ptr())
                self.assertEqual(t.nbytes, x.numel() * x.element_size())
                self.assertEqual(t.__dlpack_device__(), (1, 0))
                y = torch.from_dlpack(t)
                self.assertEqual(y.dtype, dtype)
                self.assertEqual(y.data_ptr(), x.data_ptr())
                # Bytes equal, bf16 included.
                self.assertTrue(torch.equal(y.view(torch.uint8), x.view(torch.uint8)))
                # Same memory: a write through one shows through the other.
                y[0, 0] = 3
                self.assertEqual(x[0, 0].item(), 3)

    def test_fp8_through_wshost(self):
        # torch 1.13 has no float8; wshost's own export and import carry
        # DLPack's float8_e4m3fn code (10) both ways.
        x = torch.arange(16, dtype=torch.uint8)
        u8 = wshost.from_dlpack(x)
        # Re-import of wshost's own export keeps dtype and address.
        again = wshost.from_dlpack(u8)
        self.assertEqual((again.dtype, again.data_ptr), ("u8", x.data_ptr()))
        if hasattr(torch, "float8_e4m3fn"):
            f = torch.zeros(8, dtype=torch.float8_e4m3fn)
            t = wshost.from_dlpack(f)
            self.assertEqual(t.dtype, "fp8")

    def test_non_contiguous_refused(self):
        x = torch.zeros(4, 6)
        for view in (x.t(), x[:, ::2], x[:, 1:4]):
            with self.assertRaises(wshost.Error) as cm:
                wshost.from_dlpack(view)
            self.assertIn("not contiguous", str(cm.exception))
            self.assertIn("strides", str(cm.exception))
        # Size-1 dimensions may carry any stride: still dense.
        self.assertEqual(wshost.from_dlpack(x[1:2, :]).shape, (1, 6))
        self.assertEqual(wshost.from_dlpack(torch.zeros(0, 3)).nbytes, 0)

    def test_capsule_consumed_once(self):
        t = wshost.from_dlpack(torch.ones(3))
        cap = t.__dlpack__()
        y = torch.utils.dlpack.from_dlpack(cap)
        self.assertEqual(y.tolist(), [1.0, 1.0, 1.0])
        with self.assertRaises(Exception):
            torch.utils.dlpack.from_dlpack(cap)
        with self.assertRaises(wshost.Error) as cm:
            wshost.from_dlpack(cap)
        self.assertIn("already consumed", str(cm.exception))
        # A capsule wshost takes is renamed too.
        cap2 = torch.utils.dlpack.to_dlpack(torch.ones(2))
        wshost.from_dlpack(cap2)
        with self.assertRaises(wshost.Error):
            wshost.from_dlpack(cap2)

    def test_unconsumed_capsule_releases_its_owner(self):
        x = torch.ones(5)
        t = wshost.from_dlpack(x)
        before = sys.getrefcount(t)
        cap = t.__dlpack__()
        self.assertEqual(sys.getrefcount(t), before + 1)
        del cap
        gc.collect()
        self.assertEqual(sys.getrefcount(t), before)

    def test_view_keeps_owner_alive(self):
        x = torch.arange(6, dtype=torch.float32)
        ptr = x.data_ptr()
        t = wshost.from_dlpack(x)
        del x  # t holds the producer's tensor
        y = torch.from_dlpack(t)
        del t  # y holds t, t holds the torch storage
        gc.collect()
        self.assertEqual(y.data_ptr(), ptr)
        self.assertEqual(y.tolist(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])

    def test_producer_errors(self):
        t = wshost.from_dlpack(torch.ones(2))
        with self.assertRaises(BufferError):
            t.__dlpack__(stream=1)  # cpu: stream must be None
        with self.assertRaises(BufferError):
            t.__dlpack__(copy=True)
        with self.assertRaises(TypeError):
            wshost.from_dlpack([1, 2, 3])

    def test_requires_grad_message_is_torchs(self):
        p = torch.nn.Parameter(torch.ones(2))
        with self.assertRaises(Exception):
            wshost.from_dlpack(p)
        self.assertEqual(wshost.from_dlpack(p.detach()).data_ptr, p.data_ptr())


if __name__ == "__main__":
    unittest.main(verbosity=2)
