# examples/vocab_parallel.py: each rank holds a slice of a 50257-class output layer
import torch
import torch.distributed as dist
import softcal
from softcal.distributed import vocab_parallel_cross_entropy

dist.init_process_group("gloo")            # torchrun sets the rank and the world size
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)                       # the same batch on every rank (for the check below)
N, C = 8, 50257
logits, target = torch.randn(N, C), torch.randint(0, C, (N,))
cut = [C * r // world for r in range(world + 1)]          # this rank's classes
local = logits[:, cut[rank]:cut[rank + 1]].clone().requires_grad_()

loss = vocab_parallel_cross_entropy(local, target, label_smoothing=0.1, temperature=1.5)
loss.backward()                            # local.grad: this rank's slice of the gradient
full = softcal.cross_entropy(logits, target, label_smoothing=0.1, temperature=1.5)
print(f"rank {rank}: loss {loss.item():.5f}, gathered logits {full.item():.5f}")  # float32: equal to ~1e-7
dist.destroy_process_group()
