# examples/calibrate_sharded.py: each rank evaluates its share of the validation set
import torch
import torch.distributed as dist
import softcal
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from softcal.distributed import padding_mask

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Linear(20, 10)            # stands in for a trained classifier
x = torch.randn(1001, 20)
y = (3 * model(x) - torch.log(-torch.log(torch.rand(1001, 10)))).argmax(1).detach()
sampler = DistributedSampler(TensorDataset(x, y), shuffle=False)   # 1001 rows: one is repeated
loader = DataLoader(TensorDataset(x, y), batch_size=128, sampler=sampler)

with torch.no_grad():
    batches = [(model(xb), yb) for xb, yb in loader]
logits, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
keep = padding_mask(sampler)               # False on this rank's repeated rows
logits, labels = logits[keep], labels[keep]

result = softcal.nn.TemperatureScaler().fit(logits, labels, group=dist.group.WORLD)
metrics = softcal.metrics.CalibrationMetrics(group=dist.group.WORLD)
for i in range(0, len(logits), 256):       # update per batch, compute once
    metrics.update(logits[i:i + 256], labels[i:i + 256], temperature=result.temperature)
report = metrics.compute()                 # the same on every rank
print(f"rank {dist.get_rank()}: T = {result.temperature:.6f} on {result.rows} rows, "
      f"ECE {100 * report.ece:.3f}%")
dist.destroy_process_group()
