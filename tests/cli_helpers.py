"""What the command-line tests share: running `softcal` in-process and a synthetic logit file."""

import torch

from softcal import cli


def run(args, capsys):
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def synthetic(n=600, c=5, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, c, generator=g)
    x[torch.arange(n), y] += 1.5
    return (scale * x).numpy(), y.numpy()
