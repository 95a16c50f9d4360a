#!/usr/bin/env python3
"""torch_sync.py: wshost's in-process sync of PyTorch tensors against its references.

  PYTHONPATH=build/python /usr/bin/python3 bench/torch_sync.py [--model qwen3-0.6b]
      [--steps 5] [--pipeline full_sync] [--json FILE] [--check]

One run, the same shapes three ways (the model's bf16 weights as random torch
tensors; no forward pass):
  (a) in-process: a wshost.Session over the caller's torch tensors (trainer by
      Hugging Face name, engine in vLLM's fused layout), the send time the step
      record reports;
  (b) the PyTorch peer loop: copy_ of every trainer tensor into its rows of the
      engine tensor (bench/peer_torch.py's loop at world 1);
  (c) wshost's simulated sync of the same model: `wshost pipelines/full_sync.lua
      model=... --json` as a subprocess, the same send time from its records.
Target: (a) >= 0.9x the bandwidth of (c), i.e. the binding costs nothing
measurable. --check makes the exit status fail when the target is missed.
Times are the best of steps 2..N (step 1 builds the plans).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "torch"))

import torch  # noqa: E402

import tiny_qwen3 as tq  # noqa: E402

# config.json sizes of the published models (as lua/ws/models.lua's presets).
MODELS = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=99, num_hidden_layers=2, intermediate_size=257, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=8191, tie_word_embeddings=True),
}
# Phases that make up a sync in a step record, whichever the runner reports.
SEND_PHASES = ("gather", "copy_out", "adapter", "quant")


def log(*a):
    print("torch_sync:", *a, file=sys.stderr, flush=True)


def send_ms(rec):
    """The sync's time in one step record: its `send` phase, else the sum of its parts."""
    ph = rec.get("phase_ms") or {}
    if "send" in ph:
        return float(ph["send"])
    return sum(float(ph.get(k, 0.0)) for k in SEND_PHASES)


def import_wshost():
    try:
        import wshost
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "build", "python"))
        try:
            import wshost
        except ImportError as e:
            sys.exit("torch_sync: the wshost Python module is not importable (%s); build it and run "
                     "with PYTHONPATH=build/python" % e)
    return wshost


def make_tensors(cfg):
    """Random bf16 trainer tensors by Hugging Face name and empty engine tensors."""
    g = torch.Generator().manual_seed(0)
    trainer = {}
    for name, shape in tq.hf_param_shapes(cfg):
        t = torch.empty(shape, dtype=torch.bfloat16)
        # uniform_ straight into bf16: no float32 copy of the whole model.
        t.uniform_(-0.05, 0.05, generator=g)
        trainer[name] = t
    shapes, dest = tq.engine_layout(cfg, 0)
    # Touched once, as an engine that loaded weights: step 1 is not first-touch page faults.
    engine = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shapes}
    return trainer, engine, dest


def peer_loop(trainer, engine, dest, steps):
    """bench/peer_torch.py's loop at world 1: every tensor into its engine rows."""
    times, nbytes = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        nbytes = 0
        for name, t in trainer.items():
            ename, first = dest[name]
            engine[ename][first:first + t.shape[0]].copy_(t)
            nbytes += t.numel() * t.element_size()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, nbytes


def check_engine(trainer, engine, dest):
    """Count of engine rows that differ from their trainer tensor."""
    wrong = 0
    for name, t in trainer.items():
        ename, first = dest[name]
        if not torch.equal(engine[ename][first:first + t.shape[0]], t):
            wrong += 1
    return wrong


def in_process(wshost, args, trainer, engine, dest):
    s = wshost.Session(os.path.join(ROOT, "pipelines", args.pipeline + ".lua"), model=args.model,
                       free_cache_engine=False, verify="off", steps=args.steps,
                       **({"lora_rank": 0} if args.pipeline == "verl_lora" else {}))
    for name, t in trainer.items():
        s.register("trainer", name, t, global_shape=list(t.shape))
    for name, t in engine.items():
        s.register("engine", name, t)
    for event in ("train", "rollout"):
        s.on(event, lambda step: None)
    recs, walls = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        recs.append(dict(s.step()))
        walls.append((time.perf_counter() - t0) * 1e3)
    s.close()
    return recs, walls


def simulated(args):
    wshost_bin = args.wshost or os.environ.get("WSHOST") or os.path.join(ROOT, "build", "wshost")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "sim.jsonl")
        cmd = [wshost_bin, os.path.join("pipelines", args.pipeline + ".lua"), "model=" + args.model,
               "steps=%d" % args.steps, "verify=off", "free_cache_engine=false", "progress=off"]
        if args.pipeline == "verl_lora":
            cmd.append("lora_rank=0")
        cmd += ["--json", out]
        env = dict(os.environ)
        env.setdefault("WSHOST_DEVICE", "cpu")
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("torch_sync: %s failed (exit %d):\n%s" % (" ".join(cmd), r.returncode, r.stderr[-2000:]))
        with open(out) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    return [rec for rec in recs if "step" in rec and "phase_ms" in rec], " ".join(cmd)


def best(values):
    rest = values[1:] if len(values) > 1 else values
    return min(rest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3-0.6b", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pipeline", default="full_sync", choices=("full_sync", "verl_lora"))
    ap.add_argument("--wshost", help="the wshost binary for (c) (default: $WSHOST, else build/wshost)")
    ap.add_argument("--skip-inprocess", action="store_true",
                    help="only (b) and (c): where the wshost module is not built yet")
    ap.add_argument("--json", help="also write the results as one JSON object to this file")
    ap.add_argument("--check", action="store_true", help="fail (exit 1) when a target is missed")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (step 1 builds the plans)")
    cfg = tq.tiny_config(**MODELS[args.model])
    wshost = None if args.skip_inprocess else import_wshost()

    t0 = time.perf_counter()
    trainer, engine, dest = make_tensors(cfg)
    nbytes = sum(t.numel() * t.element_size() for t in trainer.values())
    log("tensors ready in %.1f s (%d trainer, %d engine, %.1f MB)"
        % (time.perf_counter() - t0, len(trainer), len(engine), nbytes / 1e6))

    rows = []  # (what, bytes, ms, note)
    results = dict(bench="torch_sync", model=args.model, pipeline=args.pipeline, steps=args.steps,
                   torch=torch.__version__, threads=torch.get_num_threads(), bytes=nbytes)
    wrong = 0
    if wshost is not None:
        recs, walls = in_process(wshost, args, trainer, engine, dest)
        wrong += check_engine(trainer, engine, dest)
        inproc_ms = best([send_ms(r) for r in recs])
        sent = int(recs[-1].get("bytes_sent", nbytes))
        rows.append(("(a) wshost in-process", sent, inproc_ms, "step wall %.2f ms" % best(walls)))
        results.update(inprocess_send_ms=inproc_ms, inprocess_step_ms=best(walls), inprocess_bytes=sent)
        for t in engine.values():  # (b) must write the engine itself
            t.zero_()
    peer_times, peer_bytes = peer_loop(trainer, engine, dest, args.steps)
    wrong += check_engine(trainer, engine, dest)
    peer_ms = best(peer_times)
    rows.append(("(b) torch peer loop", peer_bytes, peer_ms, "copy_ per tensor"))
    sim_recs, sim_cmd = simulated(args)
    sim_ms = best([send_ms(r) for r in sim_recs])
    sim_bytes = int(sim_recs[-1].get("bytes_sent", 0))
    rows.append(("(c) wshost simulated", sim_bytes, sim_ms, "subprocess"))
    results.update(peer_ms=peer_ms, simulated_send_ms=sim_ms, simulated_bytes=sim_bytes,
                   simulated_cmd=sim_cmd, wrong_tensors=wrong)

    print("# wshost torch_sync: model %s, pipeline %s, world 1, cpu, torch %s, %d threads, "
          "best of steps 2..%d" % (args.model, args.pipeline, torch.__version__, torch.get_num_threads(),
                                  args.steps))
    print("# %-24s %12s %10s %12s  %s" % ("what", "bytes", "time(ms)", "algbw(GB/s)", "note"))
    for what, b, ms, note in rows:
        print("  %-24s %12d %10.2f %12.2f  %s" % (what, b, ms, b / (ms * 1e6) if ms > 0 else 0.0, note))
    print("#")
    ok = wrong == 0
    if wshost is not None:
        # Bandwidth ratios: the same bytes, so time ratios inverted.
        vs_sim = sim_ms / inproc_ms if inproc_ms > 0 else 0.0
        vs_peer = peer_ms / inproc_ms if inproc_ms > 0 else 0.0
        hit = vs_sim >= 0.9
        ok = ok and hit
        print("#   %-34s %s  %.2fx (target >= 0.90x)" % ("(a) vs (c) simulated", "ok  " if hit else "MISS", vs_sim))
        print("#   %-34s       %.2fx" % ("(a) vs (b) torch peer loop", vs_peer))
        results.update(inprocess_vs_simulated=vs_sim, inprocess_vs_peer=vs_peer, target_met=hit)
    print("#   %-34s       %.2fx" % ("(b) torch peer vs (c) simulated", sim_ms / peer_ms if peer_ms > 0 else 0.0))
    print("#   wrong engine tensors after each sync: %d" % wrong)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(results) + "\n")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
