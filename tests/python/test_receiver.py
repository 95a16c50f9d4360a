"""wshost.Receiver (the engine side of server mode) driven by a scripted trainer.

The trainer is tests/c/remote_send (a ws_sender run as a child process), found
in $WS_REMOTE_SEND (CTest sets it) or build/tests/remote_send.

Run: PYTHONPATH=build/python /usr/bin/python3 tests/python/test_receiver.py
"""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import unittest

import torch

import wshost

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SENDER = os.environ.get("WS_REMOTE_SEND") or os.path.join(ROOT, "build", "tests", "remote_send")
SPEC = [("model.embed_tokens.weight", "bf16", (5, 7), torch.bfloat16),
        ("model.norm.weight", "f32", (300,), torch.float32)]
_seq = [0]


def chan_name():
    _seq[0] += 1
    return "wshost-pytest-%d-%d" % (os.getpid(), _seq[0])


def expected(i, version, shape, dtype):
    """What remote_send writes: element k of tensor i at version V."""
    n = 1
    for d in shape:
        n *= d
    k = torch.arange(n, dtype=torch.int64)
    return (((7 * k + 13 * i + 3 * version) % 64).double() / 8 - 4).to(dtype).reshape(shape)


def listening(name):
    with open("/proc/net/unix") as f:
        return any(line.split()[-1] == "@" + name for line in f if len(line.split()) > 7)


def engine_tensors():
    return [torch.zeros(shape, dtype=dt) for _, _, shape, dt in SPEC]


def open_receiver(name, tensors, **kw):
    r = wshost.Receiver(name, **kw)
    for (tname, _, _, _), t in zip(SPEC, tensors):
        r.add(tname, t)
    return r


def sender(name, *actions, spec=SPEC, piece=64):
    cmd = [SENDER, name, "-p", str(piece)]
    for tname, dtype, shape, _ in spec:
        cmd += ["-t", "%s:%s:%s" % (tname, dtype, "x".join(str(d) for d in shape))]
    return subprocess.Popen(cmd + list(actions), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(p):
    out, _ = p.communicate(timeout=30)
    return p.returncode, out


class ReceiverTest(unittest.TestCase):
    def test_sync_wake_sleep_and_values(self):
        name, ts, events = chan_name(), engine_tensors(), []
        with open_receiver(name, ts) as r:
            self.assertEqual(r.state, ("none", 0))
            self.assertTrue(listening(name))
            r.on("wake", lambda tag: events.append(("wake", tag)))
            r.on("sleep", lambda level: events.append(("sleep", level)))
            p = sender(name, "wake:weights", "sync:1", "wake:kv_cache", "sleep:2", "wake:weights",
                       "sync:2", "close")
            self.assertIs(r.serve(timeout=20), True)
            rc, out = finish(p)
            self.assertEqual(rc, 0, out)
            self.assertEqual(events, [("wake", "weights"), ("wake", "kv_cache"), ("sleep", 2),
                                      ("wake", "weights")])
            self.assertEqual(r.state, ("valid", 2))
            self.assertIsNone(r.why(SPEC[0][0]))
            for i, ((tname, _, shape, dt), t) in enumerate(zip(SPEC, ts)):
                self.assertTrue(torch.equal(t, expected(i, 2, shape, dt)), tname)
                self.assertTrue(r.valid(tname))
            st = r.stats
            self.assertEqual(st["syncs"], 2)
            self.assertGreater(st["buckets"], 4)  # 64-element pieces
            self.assertEqual(r.peer_pid, 0)  # the trainer left
        self.assertTrue(r.closed)
        self.assertFalse(listening(name))

    def test_alloc_shared_tensors(self):
        """Receiver.alloc: tensors in memory the receiver shares, zeroed, viewed by torch
        through DLPack, written by syncs like any other, alive after close()."""
        name = chan_name()
        with wshost.Receiver(name) as r:
            ts = [torch.from_dlpack(r.alloc(tname, list(shape), dtype))
                  for tname, dtype, shape, _ in SPEC]
            for (tname, _, shape, dt), t in zip(SPEC, ts):
                self.assertEqual((tuple(t.shape), t.dtype), (shape, dt), tname)
                self.assertTrue(bool((t == 0).all()), tname)
            with self.assertRaisesRegex(wshost.Error, "registered already"):
                r.alloc(SPEC[0][0], [5, 7], "bf16")
            with self.assertRaisesRegex(ValueError, "unknown dtype 'f9'"):
                r.alloc("x", [3], "f9")
            with self.assertRaisesRegex(ValueError, "negative"):
                r.alloc("x", [3, -1])
            p = sender(name, "sync:3", "close")
            self.assertIs(r.serve(timeout=20), True)
            rc, out = finish(p)
            self.assertEqual(rc, 0, out)
            self.assertEqual(r.state, ("valid", 3))
        for i, ((tname, _, shape, dt), t) in enumerate(zip(SPEC, ts)):
            self.assertTrue(torch.equal(t, expected(i, 3, shape, dt)), tname)

    def test_next_one_message_at_a_time(self):
        name, ts = chan_name(), engine_tensors()
        with open_receiver(name, ts) as r:
            self.assertIsNone(r.next(timeout=0.1))  # no trainer yet
            p = sender(name, "partial:5", "close", piece=1000)
            kinds = []
            while not kinds or kinds[-1] != "closed":
                ev = r.next(timeout=10)
                self.assertIsNotNone(ev)
                kinds.append(ev["kind"])
                if ev["kind"] == "connected":
                    self.assertEqual(r.peer_pid, p.pid)
                if ev["kind"] in ("manifest", "synced"):
                    self.assertEqual(ev["weight_version"], 5)
                if ev["kind"] == "bucket":
                    self.assertEqual(ev["bytes"], 35 * 2)
            self.assertEqual(kinds, ["connected", "manifest", "slots", "bucket", "synced", "closed"])
            self.assertEqual(finish(p)[0], 0)
            self.assertTrue(r.valid(SPEC[0][0]))
            self.assertFalse(r.valid(SPEC[1][0]))  # a partial sync wrote the first only
            self.assertTrue(r.why(SPEC[1][0]))

    def test_add_refuses(self):
        with wshost.Receiver(chan_name()) as r:
            with self.assertRaises(wshost.Error) as cm:
                r.add("w", torch.zeros(3, 4).t())
            self.assertIn("'w'", str(cm.exception))
            self.assertIn("not contiguous", str(cm.exception))
            r.add("w", torch.zeros(3, 4))
            with self.assertRaises(wshost.Error) as cm:
                r.add("w", torch.zeros(2))
            self.assertIn("registered already", str(cm.exception))
            with self.assertRaises(wshost.Error) as cm:
                r.add("x", [1, 2])
            self.assertIn("'x'", str(cm.exception))
            with self.assertRaises(wshost.Error) as cm:
                r.valid("nope")
            self.assertIn("'nope'", str(cm.exception))
            with self.assertRaises(wshost.Error) as cm:
                r.on("rollout", print)
            self.assertIn("'rollout'", str(cm.exception))
            with self.assertRaises(TypeError):
                r.on("wake", 3)
            p = torch.nn.Parameter(torch.zeros(4))  # requires grad: its detached view is taken
            r.add("p", p)
            t = wshost.from_dlpack(torch.zeros(2, dtype=torch.int32))
            r.add("t", t)
        with self.assertRaises(wshost.Error) as cm:
            r.add("y", torch.zeros(1))
        self.assertIn("closed", str(cm.exception))
        r.close()  # twice is fine

    def test_name_in_use(self):
        name = chan_name()
        with wshost.Receiver(name):
            with self.assertRaises(wshost.Error) as cm:
                wshost.Receiver(name)
            self.assertIn(name, str(cm.exception))
        with wshost.Receiver(name):  # free again at once: nothing on disk
            pass

    def test_tensors_kept_alive(self):
        w = wshost.from_dlpack(torch.zeros(4))
        before = sys.getrefcount(w)
        r = wshost.Receiver(chan_name())
        r.add("t", w)
        self.assertEqual(sys.getrefcount(w), before + 1)
        r.close()
        self.assertEqual(sys.getrefcount(w), before)

    def test_manifest_that_disagrees(self):
        name, ts = chan_name(), engine_tensors()
        with open_receiver(name, ts) as r:
            p = sender(name, "badshape:1", "sync:2", "close")
            self.assertIs(r.serve(timeout=20), True)  # refused, told, serving went on
            rc, out = finish(p)
            self.assertEqual(rc, 1, out)
            line = [ln for ln in out.splitlines() if ln.startswith("error badshape")][0]
            self.assertIn("'%s'" % SPEC[0][0], line)
            self.assertIn("before any byte moved", line)
            self.assertIn("ok sync:2", out)
            self.assertEqual(r.state, ("valid", 2))

    def test_trainer_killed_mid_sync(self):
        name, ts = chan_name(), engine_tensors()
        with open_receiver(name, ts) as r:
            p = sender(name, "sync:1", "die:2")
            t0 = time.monotonic()
            with self.assertRaises(wshost.Error) as cm:
                r.serve()
            took = time.monotonic() - t0
            finish(p)
            text = str(cm.exception)
            self.assertIn("trainer process (pid %d)" % p.pid, text)
            self.assertIn("marked invalid", text)
            self.assertLess(took, 5.0)
            self.assertEqual(r.state, ("invalid", 1))
            self.assertFalse(r.valid(SPEC[0][0]))
            self.assertIn("pid %d" % p.pid, r.why(SPEC[0][0]))
            self.assertEqual(r.peer_pid, 0)
            # The engine lives on: the next trainer makes it whole.
            p2 = sender(name, "sync:3", "close")
            self.assertIs(r.serve(timeout=20), True)
            self.assertEqual(finish(p2)[0], 0)
            self.assertEqual(r.state, ("valid", 3))
            self.assertTrue(all(r.valid(n) for n, _, _, _ in SPEC))

    def test_callback_exception(self):
        name, ts = chan_name(), engine_tensors()
        with open_receiver(name, ts) as r:
            def wake(tag):
                raise ValueError("no such memory: %s" % tag)
            r.on("wake", wake)
            p = sender(name, "wake:kv_cache", "close")
            self.assertIsNotNone(r.next(timeout=10))  # connected
            with self.assertRaises(wshost.Error) as cm:
                r.next(timeout=10)
            self.assertIn("ValueError: no such memory: kv_cache", str(cm.exception))
            self.assertIsInstance(cm.exception.__cause__, ValueError)
            self.assertEqual(r.next(timeout=10)["kind"], "closed")
            rc, out = finish(p)
            self.assertIn("error wake:kv_cache", out)
            self.assertIn("ValueError: no such memory: kv_cache", out)
            self.assertIsInstance(r.last_error, ValueError)

    def test_stop_and_close_from_another_thread(self):
        r = wshost.Receiver(chan_name())
        out = {}

        def serve():
            try:
                out["result"] = r.serve()
            except BaseException as e:  # noqa: BLE001 - reported to the test
                out["error"] = e

        th = threading.Thread(target=serve)
        th.start()
        time.sleep(0.2)
        with self.assertRaises(wshost.Error) as cm:
            r.add("late", torch.zeros(1))
        self.assertIn("another thread", str(cm.exception))
        t0 = time.monotonic()
        r.stop()
        th.join(5)
        self.assertFalse(th.is_alive())
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertEqual(out, {"result": False})
        th = threading.Thread(target=serve)
        th.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        r.close()  # stops the serve first
        self.assertLess(time.monotonic() - t0, 1.0)
        th.join(5)
        self.assertTrue(r.closed)

    def test_close_while_another_thread_loops_on_next(self):
        # A call that ends with an event just as close() begins must not let
        # the loop's next call wait forever.
        for attempt in range(5):
            name = chan_name()
            r = wshost.Receiver(name)
            p = sender(name, *["wake:w%d" % i for i in range(300)], "close")
            seen = []

            def loop():
                while True:
                    try:
                        ev = r.next()
                    except wshost.Error:
                        if r.closed:
                            return
                        raise
                    if ev is None:
                        return
                    seen.append(ev["kind"])

            th = threading.Thread(target=loop)
            th.start()
            while len(seen) < 20 * (attempt + 1) and th.is_alive():
                time.sleep(0.001)
            t0 = time.monotonic()
            r.close()
            self.assertLess(time.monotonic() - t0, 1.0)
            th.join(5)
            self.assertFalse(th.is_alive())
            finish(p)
            self.assertFalse(listening(name))

    def test_ctrl_c_while_waiting_for_a_trainer(self):
        name = chan_name()
        child = textwrap.dedent("""
            import sys, time, wshost
            r = wshost.Receiver(%r)
            print("ready", flush=True)
            try:
                r.serve()
            except KeyboardInterrupt:
                print("interrupted %%.6f" %% time.monotonic(), flush=True)
                r.close()
                sys.exit(0)
            sys.exit(3)
        """ % name)
        p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ))
        self.assertEqual(p.stdout.readline().strip(), "ready")
        time.sleep(0.3)
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=10)
        self.assertEqual(p.returncode, 0, out)
        caught = float(out.split()[1])
        self.assertLess(caught - sent, 0.5)  # one liveness check (200 ms) and slack for a busy machine
        self.assertFalse(listening(name))


if __name__ == "__main__":
    if not os.access(SENDER, os.X_OK):
        print("skip: no remote_send at %s (build it: ninja -C build remote_send)" % SENDER)
        sys.exit(77)
    unittest.main()
