"""How the format-1 files here were written: with qbdl at commit f21607b (the quantized-tensor engine), run
`PYTHONPATH=<that checkout>/src python tests/data/make_v1_files.py tests/data x86` (and `fbgemm`).
qbnn_v2_bank.qbdl (+ _outputs): the same script at commit fade3a1 (format 2, before `mode` became `sampler`),
its x86 output files renamed."""

import sys

import torch
from safetensors.torch import save_file
from torch import nn

from qbdl.bayes import dnn_to_bnn
from qbdl.bayes.predict import set_mc_index
from qbdl.quant import quantize_bnn, save_qbnn


class Tiny(nn.Module):
    """conv-BN-ReLU, max pool, a residual add, adaptive average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.avg, self.fc = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(x)
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.flatten(self.avg(x), 1))


out, backend = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
net = Tiny().eval()
bnn = dnn_to_bnn(net, moped_delta=0.1).eval()
calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
q = quantize_bnn(bnn, calib, backend=backend, mode="bank", bank_size=2, mc_samples=2, seed=5)
save_qbnn(q, f"{out}/qbnn_v1_{backend}.qbdl")
x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))
logits = {}
with torch.no_grad():
    for s in range(2):
        set_mc_index(q, s)
        logits[f"mc{s}"] = q(x)
save_file({"x": x, **logits}, f"{out}/qbnn_v1_{backend}_outputs.safetensors")
print(q.qbdl_meta["activation_qmax"])
