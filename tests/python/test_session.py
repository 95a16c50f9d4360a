"""wshost.Session in-process with torch tensors (needs lua/ws/session.lua).

Run: PYTHONPATH=build/python /usr/bin/python3 tests/python/test_session.py
WS_TEST_PIPELINE names another pipeline file (default pipelines/verl_lora.lua,
preset tiny).
"""
import gc
import os
import sys
import unittest

import torch

import wshost

PIPELINE = os.environ.get("WS_TEST_PIPELINE", "pipelines/verl_lora.lua")
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16,
                "u8": torch.uint8, "i32": torch.int32, "i64": torch.int64}


def open_session(**config):
    config.setdefault("model", "tiny")
    return wshost.Session(PIPELINE, **config)


def register_all(s, keep):
    """Registers a torch tensor for every expected name (every other engine
    tensor allocated through wshost); returns the alloc'd wshost tensors."""
    allocs = []
    for role in ("trainer", "adapter", "engine"):
        for i, (name, shape, dtype) in enumerate(s.expected(role)):
            if role == "engine" and i % 2 == 0:
                allocs.append(s.alloc(name, shape, dtype))
                continue
            t = torch.zeros(shape, dtype=TORCH_DTYPES[dtype])
            keep.append(t)
            s.register(role, name, t)
    return allocs


class SessionTest(unittest.TestCase):
    def test_steps_and_callbacks(self):
        keep, events = [], []
        with open_session() as s:
            allocs = register_all(s, keep)
            self.assertTrue(s.expected("trainer"))
            s.on("train", lambda step: events.append(("train", step)))
            for n in (1, 2):
                rec = s.step()
                self.assertIsInstance(rec, dict)
                self.assertEqual(rec["step"], n)
            self.assertEqual(events, [("train", 1), ("train", 2)])
            if allocs:
                t = allocs[0]
                v = torch.from_dlpack(t)
                self.assertEqual(v.data_ptr(), t.data_ptr)
                self.assertEqual(tuple(v.shape), t.shape)
                del v
        self.assertTrue(s.closed)
        with self.assertRaises(wshost.Error) as cm:
            s.step()
        self.assertIn("closed", str(cm.exception))

    def test_callback_exception_fails_the_step(self):
        keep = []
        s = open_session()
        register_all(s, keep)

        def boom(step):
            raise ValueError("optimizer diverged at step %d" % step)

        s.on("train", boom)
        with self.assertRaises(wshost.Error) as cm:
            s.step()
        text = str(cm.exception)
        self.assertIn("train", text)
        self.assertIn("ValueError: optimizer diverged at step 1", text)
        self.assertIsInstance(cm.exception.__cause__, ValueError)

    def test_summary_after_a_failed_step_counts_the_steps_done(self):
        keep = []
        s = open_session()
        register_all(s, keep)
        calls = []

        def train(step):
            calls.append(step)
            if step == 3:
                raise ValueError("optimizer diverged at step %d" % step)

        s.on("train", train)
        s.step()
        s.step()
        with self.assertRaises(wshost.Error):
            s.step()
        summary = s.close()
        self.assertEqual(summary["steps"], 2)
        self.assertIn("ValueError: optimizer diverged at step 3", summary["failed"])

    def test_close_refused_while_a_view_lives(self):
        keep = []
        s = open_session()
        allocs = register_all(s, keep)
        if not allocs:
            self.skipTest("the pipeline's engine expects no tensors")
        t = allocs[0]
        view = torch.from_dlpack(t)
        view.fill_(1)
        with self.assertRaises(wshost.Error) as cm:
            s.close()
        self.assertIn(t.name, str(cm.exception))
        self.assertIn("nothing was freed", str(cm.exception))
        self.assertFalse(s.closed)
        self.assertTrue(bool((view == 1).all()))  # still valid memory
        del view
        gc.collect()
        s.close()
        with self.assertRaises(wshost.Error) as cm:
            t.__dlpack__()
        self.assertIn("freed by Session.close()", str(cm.exception))

    def test_errors_name_the_culprit(self):
        with self.assertRaises(wshost.Error) as cm:
            open_session(no_such_key_xyz=1)
        self.assertIn("no_such_key_xyz", str(cm.exception))
        with self.assertRaises(wshost.Error) as cm:
            wshost.Session("no/such/pipeline.lua")
        self.assertIn("no/such/pipeline.lua", str(cm.exception))
        s = open_session()
        with self.assertRaises(wshost.Error) as cm:
            s.register("trainer", "model.no_such_layer.weight", torch.zeros(3))
            s.step()
        self.assertIn("model.no_such_layer.weight", str(cm.exception))

    def test_registered_memory_is_released(self):
        x = torch.zeros(4)
        t = wshost.from_dlpack(x)
        import sys
        before = sys.getrefcount(t)
        s = open_session()
        name, shape, dtype = s.expected("trainer")[0]
        y = torch.zeros(shape, dtype=TORCH_DTYPES[dtype])
        w = wshost.from_dlpack(y)
        base = sys.getrefcount(w)
        s.register("trainer", name, w)
        self.assertEqual(sys.getrefcount(w), base + 1)
        del s
        gc.collect()
        self.assertEqual(sys.getrefcount(w), base)
        self.assertEqual(sys.getrefcount(t), before)


class InterruptTest(unittest.TestCase):
    def test_ctrl_c_during_a_step_raises_keyboard_interrupt(self):
        import signal
        import threading
        import time
        keep = []
        s = open_session(lora_rank=0)
        register_all(s, keep)
        # Ctrl-C while a callback waits: Python's own handling interrupts the
        # wait, and the step raises the KeyboardInterrupt itself.
        s.on("rollout", lambda step: time.sleep(3))
        timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
        t0 = time.monotonic()
        timer.start()
        with self.assertRaises(KeyboardInterrupt):
            s.step()
        timer.join()
        self.assertLess(time.monotonic() - t0, 2.0)
        # Python's own handler is back once the step has returned.
        self.assertIs(signal.getsignal(signal.SIGINT), signal.default_int_handler)
        s.close()
        # Ctrl-C inside a callback's own code: the same exception comes out.
        s = open_session(lora_rank=0)
        register_all(s, keep)
        s.on("rollout", lambda step: os.kill(os.getpid(), signal.SIGINT))
        with self.assertRaises(KeyboardInterrupt):
            s.step()
        s.close()


class ReviewRegressionTest(unittest.TestCase):
    def test_parameter_needing_gradients_is_registered(self):
        with open_session(lora_rank=0) as s:
            name, shape, _ = s.expected("trainer")[0]
            p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))
            s.register("trainer", name, p)
            with self.assertRaises(wshost.Error) as cm:
                s.register("trainer", s.expected("trainer")[1][0], object())
            self.assertIn("trainer tensor '%s'" % s.expected("trainer")[1][0], str(cm.exception))

    def test_alloc_of_another_session_is_refused(self):
        s1, s2 = open_session(lora_rank=0), open_session(lora_rank=0)
        name, shape, dtype = s2.expected("engine")[0]
        a = s2.alloc(name, shape, dtype)
        with self.assertRaises(wshost.Error) as cm:
            s1.register("engine", name, a)
        self.assertIn("another session allocated", str(cm.exception))
        s1.close()
        del a
        s2.close()

    def test_callback_referring_to_its_session_is_collected(self):
        t = torch.zeros(99, dtype=torch.bfloat16)
        base = sys.getrefcount(t)

        def make():
            s = open_session(lora_rank=0)
            s.register("trainer", "model.norm.weight", t)
            s.on("train", lambda step: s.closed)  # a cycle through the callback

        make()
        gc.collect()
        self.assertEqual(sys.getrefcount(t), base)


class _Shard0:
    """torch 2.x's Shard(0) placement, as far as register asks it."""
    def is_shard(self, dim=None):
        return dim in (None, 0)


class _Replicate:
    def is_shard(self, dim=None):
        return False


class _DTensorLike:
    """The part of torch 2.x's DTensor that register reads (this torch has
    none): the global shape, the placements and the local shard."""
    def __init__(self, local, shape, placement):
        self._local, self.shape, self.placements = local, torch.Size(shape), (placement,)

    def to_local(self):
        return self._local


class DTensorTest(unittest.TestCase):
    def test_dtensor_local_shard_and_placement(self):
        with open_session(lora_rank=0) as s:
            name, shape, _ = s.expected("trainer")[-1]
            full = torch.zeros(shape, dtype=torch.bfloat16)
            # World 1: the local shard is the whole tensor; the global shape
            # comes from the DTensor.
            s.register("trainer", name, _DTensorLike(full, shape, _Shard0()))
            other, oshape, _ = s.expected("trainer")[-2]
            with self.assertRaises(wshost.Error) as cm:
                s.register("trainer", other, _DTensorLike(torch.zeros(oshape), oshape,
                                                          _Replicate()))
            self.assertIn("DTensor '%s' is placed as" % other, str(cm.exception))
            self.assertIn("Shard(0)", str(cm.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
