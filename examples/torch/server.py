#!/usr/bin/env python3
"""server.py: a PyTorch trainer, and its engine in another process, synced by wshost's policy.

  PYTHONPATH=build/python /usr/bin/python3 examples/torch/server.py --steps 4 \\
      --free-cache-engine 1 --sleep-level 2 --lora-rank 4
  mpirun -n 2 /usr/bin/python3 examples/torch/server.py --steps 4   # one engine per rank

inprocess.py's loop (the same tiny decoder, the same policy file, the same
check: the engine's logits equal the trainer's after every sync, bit for bit
on the CPU), with the engine copy in a second process that this script
starts (server mode, docs/server-mode.md):

  trainer process   tiny_qwen3.TrainerModel (Hugging Face names, this rank's row
                    shards), an AdamW step per step; wshost.Session(engine_address=...)
                    registers the trainer's and the adapter's tensors only, and each
                    step wakes the engine's weights, sends them through shared-memory
                    slots with checksums, wakes its KV cache, runs the rollout
                    callback and puts the engine to sleep
  engine process    tiny_qwen3.EngineModel (vLLM's fused layout) in its own memory,
                    every tensor added to a wshost.Receiver listening on
                    "<address>-<rank>"; the receiver serves in a thread (without the
                    GIL) and runs the engine's sleep and wake, while the main thread
                    answers the trainer's rollout requests (a forward on fixed tokens,
                    the logits sent back) over a pipe

The engine's memory acts as vLLM's sleep mode does: level 1 backs the weights up
to a CPU copy and poisons the live ones with NaN (restored at wake), level 2
poisons them without a backup (only a new sync makes them right).

--policy buggy (examples/torch/buggy_policy.lua, verl #3149) skips the base after
a level-2 sleep: with --verify all the trainer's step fails before its rollout.

--fault, for the tests (tests/e2e/torch_server.sh):
  engine-dies    the engine kills itself (SIGKILL) in the middle of sync --fault-sync
                 (counted from 1; with LoRA a step that sends the base makes two syncs);
                 the trainer's step raises naming the engine's pid
  trainer-dies   the engine kills the trainer (its peer) once it accepted that sync's
                 manifest (the trainer cannot have sent its FINISH: that waits for
                 the acknowledgement of every bucket);
                 the engine reports it, keeps running with its weights marked invalid,
                 and exits cleanly on SIGTERM (or after --linger seconds)
  wrong-shape    the engine registers model.norm.weight one element longer; the first
                 sync is refused naming it before any byte moves

Exit status: 0 when every rollout matched (or --check-logits report), 1 when a
step failed (the message says which and why), 2 on bad arguments or setup.
"""

import argparse
import io
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import tiny_qwen3 as tq  # noqa: E402
from inprocess import POLICIES, fmt_diff, init_gloo, world_and_rank, write_model_dir  # noqa: E402

FAULTS = ("none", "engine-dies", "trainer-dies", "wrong-shape", "stray-write")
WRONG_SHAPE_TENSOR = "model.norm.weight"


def import_wshost(who):
    try:
        import wshost
        return wshost
    except ImportError:
        pass
    sys.path.insert(0, os.path.join(ROOT, "build", "python"))
    try:
        import wshost
        return wshost
    except ImportError as e:
        print("%s: the wshost Python module is not importable (%s); build it (ninja -C build) and "
              "run with PYTHONPATH=build/python" % (who, e), file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--free-cache-engine", type=int, choices=(0, 1), default=1)
    ap.add_argument("--sleep-level", type=int, choices=(1, 2), default=2)
    ap.add_argument("--lora-rank", type=int, default=4, help="0: LoRA off, every parameter trains")
    ap.add_argument("--lora-alpha", type=float, default=8.0)
    ap.add_argument("--verify", choices=("all", "sent", "off"), default="all")
    ap.add_argument("--policy", choices=sorted(POLICIES), default="verl_lora")
    ap.add_argument("--tied", type=int, choices=(0, 1), default=0, help="tie_word_embeddings")
    ap.add_argument("--atol", type=float, default=0.0, help="largest |logit difference| accepted")
    ap.add_argument("--check-logits", choices=("raise", "report"), default="raise",
                    help="report: print a mismatch and go on (exit 0)")
    ap.add_argument("--address", default=None,
                    help="the engines' channel names are ADDRESS-<rank> (default: "
                         "wshost-server-<pid of the launcher>)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: trainer and engine on GPU rank %% count; the slots are then GPU "
                         "memory shared through CUDA IPC")
    ap.add_argument("--engine-memory", choices=("own", "shared"), default="own",
                    help="own: the engine's weights are its own tensors, each sync lands through "
                         "wshost's shared-memory slots (two copies); shared: they are allocated "
                         "with Receiver.alloc in memory the trainer maps, and written in place")
    ap.add_argument("--fault", choices=FAULTS, default="none")
    ap.add_argument("--fault-rank", type=int, default=-1,
                    help="--fault engine-dies: only the engine of this rank (-1: every rank's)")
    ap.add_argument("--fault-sync", type=int, default=3,
                    help="the sync the fault hits, counted from 1 (default 3: step 2's base sync "
                         "with LoRA and a level-2 sleep)")
    ap.add_argument("--fault-bucket", type=int, default=1,
                    help="engine-dies: after this bucket of that sync (before its FINISH)")
    ap.add_argument("--linger", type=float, default=None,
                    help="seconds the engine keeps running once the trainer is gone (default: 0, "
                         "or 60 with --fault trainer-dies)")
    ap.add_argument("--master-port", type=int, default=None)
    # The engine process is this script again.
    ap.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.device == "cuda" and args.engine_memory == "shared":
        ap.error("--engine-memory shared is host memory (memfd); on a GPU the slots are shared "
                 "through CUDA IPC instead")
    if args.lora_rank < 0:
        ap.error("--lora-rank must be >= 0")
    if args.linger is None:
        args.linger = 60.0 if args.fault == "trainer-dies" else 0.0
    return args


# ---------------------------------------------------------------- the pipe between the two

def send_msg(f, obj):
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def recv_msg(f):
    head = f.read(8)
    if len(head) < 8:
        return None  # the other side is gone
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def tensor_bytes(t):
    buf = io.BytesIO()
    torch.save(t.cpu(), buf)
    return buf.getvalue()


def tensor_from(data):
    return torch.load(io.BytesIO(data))


# ---------------------------------------------------------------- engine process

class Engine:
    """The engine process: its weights, the receiver and the thread serving it."""

    def __init__(self, args, wshost):
        self.args, self.wshost = args, wshost
        self.name = "%s-%d" % (args.address, args.rank)
        self.cfg = tq.tiny_config(tied=bool(args.tied))
        self.device = tq.device_of(args.device, args.rank, "server")
        self.model = tq.EngineModel(self.cfg, args.lora_rank, args.lora_alpha, device=self.device)
        for t in self.model.weights.values():
            t.zero_()
        if args.fault == "wrong-shape":
            shape = list(self.model.weights[WRONG_SHAPE_TENSOR].shape)
            shape[0] += 1
            self.model.weights[WRONG_SHAPE_TENSOR] = torch.zeros(shape, dtype=tq.DTYPE)
        self.eval_tokens = tq.fixed_tokens(self.cfg, seed=7).to(self.device)
        self.receiver = wshost.Receiver(self.name)
        if args.engine_memory == "shared":
            # The model computes on the receiver's shared tensors themselves.
            for name, t in list(self.model.weights.items()):
                shared = torch.from_dlpack(self.receiver.alloc(name, list(t.shape), "bf16"))
                self.model.weights[name] = shared
        else:
            for name, t in self.model.weights.items():
                self.receiver.add(name, t)
        self.receiver.on("sleep", self.on_sleep)
        self.receiver.on("wake", self.on_wake)
        self.syncs = 0
        self.buckets = 0
        self.errors = []
        self.thread = threading.Thread(target=self.serve, name="wshost-receiver", daemon=True)

    def log(self, msg):
        print("engine %d (pid %d): %s" % (self.args.rank, os.getpid(), msg), file=sys.stderr, flush=True)

    def on_sleep(self, level):
        self.model.sleep(int(level))

    def on_wake(self, tags):
        self.model.wake(tags)
        # review fault: waking the KV cache clobbers a weight (after the sync's FINISH)
        if self.args.fault == "stray-write" and "kv_cache" in str(tags):
            self.model.weights["model.norm.weight"].add_(1.0)
            self.log("stray write: model.norm.weight += 1 at wake(kv_cache)")

    def fault(self, ev):
        """Counts the syncs and buckets; --fault strikes inside sync --fault-sync."""
        a = self.args
        if ev["kind"] == "manifest":
            self.syncs += 1
            self.buckets = 0
            if a.fault == "trainer-dies" and self.syncs == a.fault_sync:
                pid = self.receiver.peer_pid
                self.log("killing the trainer (pid %d) after the manifest of sync %d" % (pid, self.syncs))
                os.kill(pid, signal.SIGKILL)
        elif ev["kind"] == "bucket":
            self.buckets += 1
            if a.fault == "engine-dies" and self.syncs == a.fault_sync and self.buckets == a.fault_bucket \
                    and a.fault_rank in (-1, a.rank):
                self.log("killing myself after bucket %d of sync %d (t=%.6f)"
                         % (self.buckets, self.syncs, time.monotonic()))
                os.kill(os.getpid(), signal.SIGKILL)

    def serve(self):
        """One message at a time, trainer after trainer, until stop()."""
        while True:
            try:
                ev = self.receiver.next()
            except self.wshost.Error as e:
                if self.receiver.closed:
                    return  # close() from the main thread
                # The trainer died, went silent or was refused: the receiver told
                # it (when it could) and goes on; the weights of a sync cut short
                # stay marked invalid.
                self.errors.append(str(e))
                state, version = self.receiver.state
                invalid = [n for n in self.model.weights if not self.receiver.valid(n)]
                self.log("error: %s" % e)
                self.log("weights %s (last verified version %d), %d of %d tensors valid%s; still serving"
                         % (state, version, len(self.model.weights) - len(invalid), len(self.model.weights),
                            " ('%s': %s)" % (invalid[0], self.receiver.why(invalid[0])) if invalid else ""))
                continue
            if ev is None:
                return  # stop()
            if self.args.fault in ("engine-dies", "trainer-dies"):
                self.fault(ev)

    def rollout(self):
        state, version = self.receiver.state
        with torch.no_grad():
            logits = self.model.forward(self.eval_tokens)
        return {"logits": tensor_bytes(logits), "state": state, "version": version}

    def summary(self):
        state, version = self.receiver.state
        zero = all(bool((t == 0).all()) for t in self.model.weights.values())
        return {"state": state, "version": version, "errors": list(self.errors),
                "valid": {n: self.receiver.valid(n) for n in self.model.weights},
                "untouched": zero, "stats": self.receiver.stats}


def engine_main(args):
    wshost = import_wshost("engine")
    torch.set_num_threads(1)
    ctl_in, ctl_out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout is the pipe to the trainer
    # SIGTERM: leave cleanly (the receiver's socket and mappings go with close()).
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(0))
    try:
        engine = Engine(args, wshost)
    except Exception as e:  # noqa: BLE001 - reported to the trainer
        send_msg(ctl_out, {"error": "engine %d: %s" % (args.rank, e)})
        return 2
    engine.thread.start()
    send_msg(ctl_out, {"ready": True, "pid": os.getpid(), "name": engine.name,
                       "bytes": engine.model.bytes()})
    status = 0
    try:
        while True:
            req = recv_msg(ctl_in)
            if req is None:
                # The trainer is gone. The receiver keeps serving (a new trainer
                # may connect) for --linger seconds, or until SIGTERM.
                state, version = engine.receiver.state
                engine.log("the trainer is gone; weights %s (version %d); alive for %g s more "
                           "(SIGTERM ends it)" % (state, version, args.linger))
                deadline = time.monotonic() + args.linger
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                break
            op = req.get("op")
            try:
                if op == "rollout":
                    reply = engine.rollout()
                elif op == "summary":
                    reply = engine.summary()
                elif op == "exit":
                    send_msg(ctl_out, {"ok": True})
                    break
                else:
                    reply = {"error": "unknown request %r" % op}
            except Exception as e:  # noqa: BLE001 - the trainer raises it
                reply = {"error": "%s: %s" % (type(e).__name__, e)}
            send_msg(ctl_out, reply)
    finally:
        engine.receiver.close()  # stops the serving thread first
        engine.thread.join(5)
        engine.log("exiting cleanly")
    return status


# ---------------------------------------------------------------- trainer process

class EngineProcess:
    """The engine child: started with this script, talked to over its stdin/stdout."""

    def __init__(self, args, rank):
        cmd = [sys.executable, os.path.abspath(__file__), "--engine", "--rank", str(rank),
               "--address", args.address, "--lora-rank", str(args.lora_rank),
               "--lora-alpha", str(args.lora_alpha), "--tied", str(args.tied),
               "--fault", args.fault, "--fault-sync", str(args.fault_sync),
               "--fault-bucket", str(args.fault_bucket), "--fault-rank", str(args.fault_rank),
               "--linger", str(args.linger),
               "--engine-memory", args.engine_memory, "--device", args.device]
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        hello = recv_msg(self.proc.stdout)
        if not hello or "error" in hello:
            raise RuntimeError(hello["error"] if hello else "the engine process exited at start "
                               "(exit %s)" % self.proc.wait())
        self.pid, self.name = hello["pid"], hello["name"]
        self.bytes = hello["bytes"]

    def ask(self, req):
        try:
            send_msg(self.proc.stdin, req)
        except (BrokenPipeError, OSError):
            raise RuntimeError("the engine process (pid %d) is gone (exit %s)"
                               % (self.pid, self.proc.poll()))
        reply = recv_msg(self.proc.stdout)
        if reply is None:
            raise RuntimeError("the engine process (pid %d) is gone (exit %s)"
                               % (self.pid, self.proc.wait()))
        if "error" in reply:
            raise RuntimeError("engine process (pid %d): %s" % (self.pid, reply["error"]))
        return reply

    def stop(self):
        """Asks it to leave; returns its exit status."""
        if self.proc.poll() is None:
            try:
                self.ask({"op": "exit"})
            except RuntimeError:
                pass
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Run:
    """The trainer and what its events need; the engine is another process."""

    def __init__(self, args, world, rank, engine):
        self.args, self.world, self.rank, self.engine = args, world, rank, engine
        self.cfg = tq.tiny_config(tied=bool(args.tied))
        self.device = tq.device_of(args.device, rank, "server")
        self.trainer = tq.TrainerModel(self.cfg, args.lora_rank, args.lora_alpha, seed=0,
                                       world=world, rank=rank, device=self.device)
        self.train_tokens = tq.fixed_tokens(self.cfg, seed=100 + rank).to(self.device)
        self.eval_tokens = tq.fixed_tokens(self.cfg, seed=7).to(self.device)
        self.want = None
        self.loss = None
        self.checked = {}
        self.states = {}

    def on_train(self, step):
        self.loss = self.trainer.train_step(self.train_tokens)
        with torch.no_grad():
            self.want = self.trainer(self.eval_tokens)

    def on_rollout(self, step):
        reply = self.engine.ask({"op": "rollout", "step": int(step)})
        got = tensor_from(reply["logits"]).to(self.device)
        self.states[int(step)] = reply["state"]
        diff = tq.max_abs_diff(got, self.want)
        self.checked[int(step)] = diff
        if not diff <= self.args.atol:
            msg = ("step %s: the engine's logits differ from the trainer's by %s (tolerance %g); "
                   "the engine's weights are not the trainer's (the engine's receiver says %s)"
                   % (step, fmt_diff(diff), self.args.atol, reply["state"]))
            if self.args.check_logits == "raise":
                raise RuntimeError(msg)
            if self.rank == 0:
                print("server: MISMATCH " + msg, flush=True)


def trainer_main(args):
    world, rank = world_and_rank()
    wshost = import_wshost("server")
    if args.address is None:
        # Every rank must pick the same address without talking: mpirun's pid.
        args.address = "wshost-server-%d" % (os.getppid() if world > 1 else os.getpid())
    if world > 1:
        torch.set_num_threads(1)
        init_gloo(world, rank, args.master_port)
    try:
        engine = EngineProcess(args, rank)
    except Exception as e:  # noqa: BLE001
        print("server: the engine process did not start: %s" % e, file=sys.stderr)
        return 2
    print("# server: rank %d, engine pid %d on %s" % (rank, engine.pid, engine.name), flush=True)
    run = Run(args, world, rank, engine)
    model_dir = write_model_dir(run.cfg, world)
    policy = POLICIES[args.policy]
    status = 0
    s = None
    try:
        s = wshost.Session(policy, model=model_dir, engine_address=args.address,
                           free_cache_engine=bool(args.free_cache_engine),
                           sleep_level=args.sleep_level, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, steps=args.steps, verify=args.verify,
                           device=run.device)
    except Exception as e:  # noqa: BLE001 - wshost's message names the key or the file
        print("server: cannot open %s in server mode: %s" % (policy, e), file=sys.stderr)
        status = 2
    if status == 0:
        try:
            trainer = run.trainer
            for role, params in (("trainer", trainer.base_params()), ("adapter", trainer.adapter_params())):
                for name, p in params.items():
                    s.register(role, name, p.detach(), global_shape=list(trainer.global_shape(name)))
            s.on("train", run.on_train)
            s.on("rollout", run.on_rollout)
        except Exception as e:  # noqa: BLE001
            print("server: registering the tensors failed: %s" % e, file=sys.stderr)
            status = 2
    if rank == 0 and status == 0:
        print("# server: policy %s, world %d, lora_rank %d, free_cache_engine %d, sleep_level %d, "
              "verify %s, engine %.1f KB in %d process(es), torch %s"
              % (args.policy, world, args.lora_rank, args.free_cache_engine, args.sleep_level,
                 args.verify, engine.bytes / 1024, world, torch.__version__), flush=True)
    step = 0
    while status == 0 and step < args.steps:
        step += 1
        t0 = time.perf_counter()
        try:
            rec = s.step()
        except Exception as e:  # noqa: BLE001
            print("server: step %d failed (rank %d, t=%.6f): %s" % (step, rank, time.monotonic(), e),
                  file=sys.stderr, flush=True)
            status = 1
            break
        ms = (time.perf_counter() - t0) * 1e3
        if step not in run.checked:
            print("server: step %d ran no rollout, so nothing compared the engine with the trainer"
                  % step, file=sys.stderr)
            status = 1
            break
        if rank == 0:
            rec = rec or {}
            print("step %d  loss %.4f  max|diff| %s  bytes_sent %d  base %s  adapter %s  engine %s  %.1f ms"
                  % (step, run.loss, fmt_diff(run.checked[step]), int(rec.get("bytes_sent", 0)),
                     "sent" if rec.get("base_sent") else "-", "sent" if rec.get("adapter_sent") else "-",
                     run.states[step], ms), flush=True)
    if s is not None:
        try:
            s.close()
        except Exception as e:  # noqa: BLE001
            print("server: close failed: %s" % e, file=sys.stderr)
            status = status or 1
    try:
        summary = engine.ask({"op": "summary"})
        print("# server: rank %d: engine weights %s (version %d), %d of %d tensors valid, "
              "%d verified syncs%s"
              % (rank, summary["state"], summary["version"], sum(summary["valid"].values()),
                 len(summary["valid"]), summary["stats"]["syncs"],
                 ", all still zero" if summary["untouched"] else ""), flush=True)
    except RuntimeError as e:
        print("server: rank %d: %s" % (rank, e), file=sys.stderr, flush=True)
    code = engine.stop()
    if code not in (0, None) and args.fault != "engine-dies":
        print("server: rank %d: the engine process exited with %s" % (rank, code), file=sys.stderr)
        status = status or 1
    if world > 1 and status == 0:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    # After a failure the other ranks may wait in a collective of wshost's
    # that this rank will not join: no barrier then; at exit wshost ends the
    # whole job (MPI_Abort) instead of finalizing.
    if rank == 0:
        shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)
    if status == 0 and rank == 0:
        worst = max(run.checked.values(), key=lambda d: math.inf if math.isnan(d) else d)
        print("server: %d steps, max |logit diff| %s over all rollouts%s"
              % (step, fmt_diff(worst), "" if worst <= args.atol else " (reported, not failed)"), flush=True)
    return status


def main(argv=None):
    args = parse_args(argv)
    if args.engine:
        return engine_main(args)
    return trainer_main(args)


if __name__ == "__main__":
    sys.exit(main())
