#!/usr/bin/env python3
"""inprocess.py: a PyTorch trainer and engine in one process, synced by wshost's policy.

  PYTHONPATH=build/python /usr/bin/python3 examples/torch/inprocess.py --steps 4 \\
      --free-cache-engine 1 --sleep-level 2 --lora-rank 4
  mpirun -n 2 /usr/bin/python3 examples/torch/inprocess.py --steps 4
  PYTHONPATH=build/python python3 examples/torch/inprocess.py --device cuda   # on a GPU
  PYTHONPATH=build/python python3 examples/torch/inprocess.py --device cuda --trainer fsdp2

The trainer (tiny_qwen3.TrainerModel, Hugging Face names, this rank's FSDP row
shards) takes an AdamW step on every step; the engine (tiny_qwen3.EngineModel,
vLLM's fused layout) is a full copy on every rank. pipelines/verl_lora.lua
decides what wshost sends and when the engine sleeps; this script only
registers the tensors and answers the events:

  train    the optimizer step, then the trainer's logits on fixed tokens
  rollout  the engine's logits on the same tokens, compared with the trainer's
  sleep    --memory=callbacks: the engine discards its weights as vLLM's allocator
           does (level 1: backup to a CPU copy, live copy overwritten with NaN;
           level 2: NaN, no backup) and drops its KV cache; --memory=wshost: the
           weights live in wshost's sleepable pool (s.alloc), only the KV cache is
           the engine's own
  wake     the reverse ("weights": restore a level-1 backup; "kv_cache": a new cache)

Both sides compute in bf16 with the same operations, so the logits must be equal
bit for bit (--atol 0; see tiny_qwen3.py). --policy buggy runs
examples/torch/buggy_policy.lua, which skips the base after a level-2 sleep
(verl #3149): with --verify all or sent wshost must stop before the rollout; with
--verify off the engine's logits come out wrong, which --check-logits report
prints without failing.

Exit status: 0 when every rollout matched (or --check-logits report), 1 when a
step failed (the message says which and why), 2 on bad arguments or setup.
"""

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tiny_qwen3 as tq  # noqa: E402

POLICIES = {"verl_lora": os.path.join(ROOT, "pipelines", "verl_lora.lua"),
            "buggy": os.path.join(HERE, "buggy_policy.lua")}


def import_wshost():
    try:
        import wshost
        return wshost
    except ImportError:
        pass
    build = os.path.join(ROOT, "build", "python")
    if os.path.isdir(build):
        sys.path.insert(0, build)
        try:
            import wshost
            return wshost
        except ImportError as e:
            sys.exit("inprocess: cannot import wshost from %s: %s" % (build, e))
    print("inprocess: the wshost Python module is not importable; build it (ninja -C build) "
          "and run with PYTHONPATH=build/python", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--free-cache-engine", type=int, choices=(0, 1), default=1)
    ap.add_argument("--sleep-level", type=int, choices=(1, 2), default=2)
    ap.add_argument("--lora-rank", type=int, default=4, help="0: LoRA off, every parameter trains")
    ap.add_argument("--lora-alpha", type=float, default=8.0)
    ap.add_argument("--memory", choices=("callbacks", "wshost"), default="callbacks",
                    help="who owns the engine's weights: the engine (sleep/wake callbacks) or wshost's pool")
    ap.add_argument("--verify", choices=("all", "sent", "off"), default="all")
    ap.add_argument("--policy", choices=sorted(POLICIES), default="verl_lora")
    ap.add_argument("--tied", type=int, choices=(0, 1), default=0, help="tie_word_embeddings")
    ap.add_argument("--atol", type=float, default=0.0, help="largest |logit difference| accepted")
    ap.add_argument("--check-logits", choices=("raise", "report"), default="raise",
                    help="report: print a mismatch and go on (exit 0)")
    ap.add_argument("--trainer", choices=("rows", "fsdp2"), default="rows",
                    help="rows: this script's own dim-0 row shards (any torch); fsdp2: torch's "
                         "fully_shard, its DTensor parameters registered as they are (torch >= 2.4)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where both models and wshost's plans run (cuda: this rank's GPU, "
                         "rank %% GPU count)")
    ap.add_argument("--master-port", type=int, default=None,
                    help="gloo's port at world > 1 (default: MASTER_PORT, else derived from the launcher)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.lora_rank < 0:
        ap.error("--lora-rank must be >= 0")
    return args


def world_and_rank():
    for size, rank in (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "RANK")):
        if size in os.environ:
            return int(os.environ[size]), int(os.environ[rank])
    return 1, 0


def fully_shard_fn():
    """torch's FSDP2 entry point, or None on a torch without it (older ones may even
    fail to import their FSDP package)."""
    for module in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            return getattr(__import__(module, fromlist=["fully_shard"]), "fully_shard")
        except Exception:  # noqa: BLE001 - ImportError, AttributeError, or a broken import
            continue
    return None


def init_gloo(world, rank, port, backend="gloo"):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if port is None:
        # Every rank must pick the same port without talking: mpirun's pid is the
        # parent of all of its local ranks.
        port = int(os.environ.get("MASTER_PORT", 20000 + os.getppid() % 20000))
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world)


class Run:
    """The trainer, the engine and what the events need to compare them."""

    def __init__(self, args, world, rank):
        self.args, self.world, self.rank = args, world, rank
        self.cfg = tq.tiny_config(tied=bool(args.tied))
        self.device = tq.device_of(args.device, rank, "inprocess")
        self.fsdp2 = args.trainer == "fsdp2"
        if self.fsdp2:
            # Whole parameters, then torch shards them (Shard(0) DTensors over
            # the world); its own hooks gather them for each forward.
            self.trainer = tq.TrainerModel(self.cfg, args.lora_rank, args.lora_alpha, seed=0,
                                           device=self.device)
            fully_shard_fn()(self.trainer)
            self.optimizer = torch.optim.AdamW(
                [p for p in self.trainer.parameters() if p.requires_grad], lr=2e-3,
                weight_decay=0.0)
        else:
            self.trainer = tq.TrainerModel(self.cfg, args.lora_rank, args.lora_alpha, seed=0,
                                           world=world, rank=rank, device=self.device)
        # each rank its own training batch; the same evaluation tokens on every rank
        self.train_tokens = tq.fixed_tokens(self.cfg, seed=100 + rank).to(self.device)
        self.eval_tokens = tq.fixed_tokens(self.cfg, seed=7).to(self.device)
        self.engine = None
        self.want = None  # the trainer's logits after its latest step
        self.loss = None
        self.checked = {}  # step -> max |diff|
        self.events = []

    # -- events (wshost calls these from step())
    def on_train(self, step):
        if self.fsdp2:
            loss = tq.next_token_loss(self.trainer(self.train_tokens), self.train_tokens)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.loss = float(loss.detach())
        else:
            self.loss = self.trainer.train_step(self.train_tokens)
        with torch.no_grad():
            self.want = self.trainer(self.eval_tokens)  # gathers the shards: every rank calls it
        self.events.append("train")

    def on_rollout(self, step):
        self.events.append("rollout")
        with torch.no_grad():
            got = self.engine.forward(self.eval_tokens)
        diff = tq.max_abs_diff(got, self.want)
        self.checked[int(step)] = diff
        if not diff <= self.args.atol:  # nan compares false
            msg = ("step %s: the engine's logits differ from the trainer's by %s (tolerance %g); "
                   "the engine's weights are not the trainer's" % (step, fmt_diff(diff), self.args.atol))
            if self.args.check_logits == "raise":
                raise RuntimeError(msg)
            if self.rank == 0:
                print("inprocess: MISMATCH " + msg, flush=True)

    def on_sleep(self, level):
        self.events.append("sleep(%s)" % level)
        self.engine.sleep(int(level))

    def on_wake(self, tags):
        self.events.append("wake(%s)" % tags)
        self.engine.wake(tags)


def fmt_diff(d):
    return "nan" if math.isnan(d) else "%.6g" % d


def write_model_dir(cfg, world):
    """A directory holding config.json. wshost checks that every rank got the same
    model= value, so at world > 1 the path is the launcher's (every rank writes the
    same bytes, each through a rename)."""
    if world == 1:
        base = tempfile.mkdtemp(prefix="wshost-tiny-qwen3-")
    else:
        base = os.path.join(tempfile.gettempdir(), "wshost-tiny-qwen3-%d" % os.getppid())
    model_dir = os.path.join(base, "model")
    staged = os.path.join(base, "staged-%d" % os.getpid())
    tq.write_config(cfg, staged)
    os.makedirs(model_dir, exist_ok=True)
    os.replace(os.path.join(staged, "config.json"), os.path.join(model_dir, "config.json"))
    os.rmdir(staged)
    return model_dir


def register_all(s, run, memory):
    trainer = run.trainer
    for role, params in (("trainer", trainer.base_params()), ("adapter", trainer.adapter_params())):
        for name, p in params.items():
            if run.fsdp2:
                s.register(role, name, p)  # a DTensor: wshost takes its local shard and shape
            else:
                s.register(role, name, p.detach(), global_shape=list(trainer.global_shape(name)))
    if memory == "callbacks":
        for name, t in run.engine.weights.items():
            s.register("engine", name, t)
    # memory == "wshost": s.alloc made (and named) every engine tensor already.


def main(argv=None):
    args = parse_args(argv)
    world, rank = world_and_rank()
    wshost = import_wshost()
    if args.trainer == "fsdp2" and fully_shard_fn() is None:
        print("inprocess: --trainer fsdp2 needs torch >= 2.4 (fully_shard); this is torch %s"
              % torch.__version__, file=sys.stderr)
        return 2
    if world > 1 or args.trainer == "fsdp2":
        torch.set_num_threads(1)
        init_gloo(world, rank, args.master_port,
                  "nccl" if args.device == "cuda" and args.trainer == "fsdp2" else "gloo")
    run = Run(args, world, rank)
    model_dir = write_model_dir(run.cfg, world)
    policy = POLICIES[args.policy]

    try:
        s = wshost.Session(policy, model=model_dir, device=run.device,
                           free_cache_engine=bool(args.free_cache_engine),
                           sleep_level=args.sleep_level, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, steps=args.steps, verify=args.verify)
    except Exception as e:  # wshost's message names the key or the file
        print("inprocess: cannot open %s: %s" % (policy, e), file=sys.stderr)
        return 2

    if args.memory == "wshost":
        def alloc(name, shape, dtype):
            return torch.from_dlpack(s.alloc(name, list(shape), "bf16"))
        run.engine = tq.EngineModel(run.cfg, args.lora_rank, args.lora_alpha, alloc=alloc,
                                    own_memory=False, device=run.device)
    else:
        run.engine = tq.EngineModel(run.cfg, args.lora_rank, args.lora_alpha, device=run.device)

    status = 0
    try:
        register_all(s, run, args.memory)
        s.on("train", run.on_train)
        s.on("rollout", run.on_rollout)
        s.on("sleep", run.on_sleep)
        s.on("wake", run.on_wake)
    except Exception as e:  # a name, shape or dtype wshost does not expect
        print("inprocess: registering the tensors failed: %s" % e, file=sys.stderr)
        status = 2
    if rank == 0 and status == 0:
        print("# inprocess: policy %s, world %d, lora_rank %d, free_cache_engine %d, sleep_level %d, "
              "memory %s, verify %s, engine %.1f KB, torch %s"
              % (args.policy, world, args.lora_rank, args.free_cache_engine, args.sleep_level, args.memory,
                 args.verify, run.engine.bytes() / 1024, torch.__version__), flush=True)
    step = 0
    while status == 0 and step < args.steps:
        step += 1
        t0 = time.perf_counter()
        try:
            rec = s.step()
        except Exception as e:
            print("inprocess: step %d failed (rank %d): %s" % (step, rank, e), file=sys.stderr, flush=True)
            status = 1
            break
        ms = (time.perf_counter() - t0) * 1e3
        if step not in run.checked:
            print("inprocess: step %d ran no rollout, so nothing compared the engine with the trainer"
                  % step, file=sys.stderr)
            status = 1
            break
        if rank == 0:
            rec = rec or {}
            print("step %d  loss %.4f  max|diff| %s  bytes_sent %d  base %s  adapter %s  %.1f ms"
                  % (step, run.loss, fmt_diff(run.checked[step]), int(rec.get("bytes_sent", 0)),
                     "sent" if rec.get("base_sent") else "-", "sent" if rec.get("adapter_sent") else "-", ms),
                  flush=True)

    # The engine's views into wshost's pool go before the pool does.
    run.engine = None
    gc.collect()
    try:
        s.close()
    except Exception as e:
        print("inprocess: close failed: %s" % e, file=sys.stderr)
        status = status or 1
    if world > 1:
        dist.barrier()  # every rank has read config.json
        dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(os.path.dirname(model_dir), ignore_errors=True)
    if status == 0 and rank == 0:
        worst = max(run.checked.values(), key=lambda d: math.inf if math.isnan(d) else d)
        print("inprocess: %d steps, max |logit diff| %s over all rollouts%s"
              % (step, fmt_diff(worst), "" if worst <= args.atol else " (reported, not failed)"), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
