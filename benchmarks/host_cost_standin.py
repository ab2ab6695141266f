"""Host cost of one eager basis_linear forward / forward+backward on its CUDA code path, measured on a CPU.

The Triton path is forced (`use_triton` -> True) and the three kernel launches are replaced by a counting no-op, so
what is timed is everything else the host does per call: our wrappers, the autograd Function and its backward node,
the cuBLAS-side bmm dispatches (computing on tiny CPU tensors), allocations, checks. Triton's own launcher cost (3
launches per forward+backward) is not in it: benchmark_basis_vs_linear.py's host_decode_*_us columns measure it on
a GPU. Times are this thread's CPU time (time.thread_time: a shared machine's preemption does not count), best of
41 rounds of 50 calls; the dense nn.Linear forward+backward on the same tiny tensors is the yardstick.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/host_cost_standin.py
"""
import sys, time, statistics, collections
import torch
import hf_basis.ops.basis_decode as bd
import hf_basis.ops.basis_decode_triton as bdt

launches = collections.Counter()
class Stub:
    def __init__(self, name):
        self.name = name
        def launch(*args, **kwargs):
            launches[name] += 1
        self.launch = launch
    def __getitem__(self, grid):
        return self.launch
for name in ("_decode_forward_kernel", "_transpose_rowsum_kernel", "_segment_sum_kernel"):
    setattr(bdt, name, Stub(name))
bd.use_triton = lambda *t: True
from hf_basis.ops.basis_linear import basis_linear

dev = "cpu"
T, H, V, B, K = 8, 64, 256, 8, 16  # tiny: the dispatches, not the arithmetic, are what is timed
dt = torch.float32
x = torch.empty(T, H, device=dev, dtype=dt).requires_grad_()
C = torch.empty(B, K, H // B, device=dev, dtype=dt).requires_grad_()
codes = torch.zeros(V, B, device=dev, dtype=torch.int16)
bias = torch.empty(V, device=dev, dtype=dt).requires_grad_()
grad_out = torch.empty(T, V, device=dev, dtype=dt)
lin = torch.nn.Linear(H, V, device=dev, dtype=dt)
params = [x, C, bias]

def basis_fwd(): return basis_linear(x, C, codes, bias)
def basis_step(): basis_linear(x, C, codes, bias).backward(grad_out)
def dense_step(): lin(x).backward(grad_out)

def host_us(fn, ps, calls=50, reps=41):
    for _ in range(20): fn()
    res = []
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(calls):
            for p in ps: p.grad = None
            fn()
        res.append((time.thread_time() - t0) / calls * 1e6)
    return min(res)

torch.set_num_threads(1)
basis_step()
launches.clear(); basis_step(); print("triton launches per fwd+bwd:", dict(launches))
for i in range(3):
    print(f"basis fwd {host_us(basis_fwd, []):6.1f} us  basis fwd+bwd {host_us(basis_step, params):6.1f} us  "
          f"dense fwd+bwd {host_us(dense_step, [x, lin.weight, lin.bias]):6.1f} us")
from torch.profiler import profile
for p in params: p.grad = None
with profile() as prof:
    basis_step()
ev = [e for e in prof.events()]
names = collections.Counter(e.name for e in ev if e.name.startswith("aten::"))
print("aten ops (incl. nested):", sum(names.values()))
print(sorted(names.items(), key=lambda kv: -kv[1]))
top = [e for e in ev if e.name.startswith("aten::")
       and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
print("top-level aten ops:", len(top), collections.Counter(e.name for e in top))
