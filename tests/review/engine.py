# engine.py NAME NUMEL: a wshost.Receiver holding one bf16 tensor 'w' of NUMEL zeros; serves
# until the sender closes, then prints the tensor's state and values.
import sys, torch
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "python"))
import wshost
name, n = sys.argv[1], int(sys.argv[2])
w = torch.full((n,), -7.0, dtype=torch.bfloat16)
r = wshost.Receiver(name)
r.add("w", w)
import time
r.on("sleep", lambda level: time.sleep(1))
print("engine: listening", flush=True)
try:
    r.serve()
except Exception as e:
    print("engine: serve error:", e, flush=True)
print("engine: valid=%s why=%s" % (r.why("w") is None, r.why("w")), flush=True)
print("engine: w =", w.float().tolist(), flush=True)
