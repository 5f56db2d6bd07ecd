"""The data a calibrator is fitted on, read the same way by every calibrator.

Three ways to give the data (see ``TemperatureScaler.fit``):

* ``(logits, labels)``: a tensor or numpy array pair;
* ``(model, loader)``: logits collected once from the model, in eval mode under no_grad, on the
  model's device, from batches ``(inputs, labels, ...)``;
* a re-iterable stream of ``(logits, labels)`` chunks (a list, a DataLoader, or a zero-argument
  callable returning a fresh iterator), read once per pass.

:func:`fit_source` turns any of them into a *source*: a list of chunks or a zero-argument
callable returning an iterator of chunks (:func:`chunks` iterates either).
:func:`check_chunk` does the cheap checks of one chunk (dtypes, shapes, classes, label range),
:func:`check_values` the checks that read every logit (NaN, +inf, a label's logit of -inf);
a calibrator runs the latter where its statistics came out non-finite (or always).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, Union

import torch

__all__ = ["as_tensor", "check_chunk", "check_values", "chunks", "collect_logits",
           "fit_source", "is_array", "warn_if_probabilities"]

ArrayLike = Any  # torch.Tensor or numpy.ndarray
Source = Union[List[Tuple[Any, Any]], Callable[[], Iterator]]


def is_array(x: Any) -> bool:
    """Whether x is a torch.Tensor or a numpy.ndarray."""
    if isinstance(x, torch.Tensor):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, np.ndarray)


def as_tensor(x: Any) -> torch.Tensor:
    """x as a tensor (numpy arrays without a copy)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x)


def chunk_source(fn: str, data: Any) -> Callable[[], Iterator]:
    """A zero-argument callable returning a fresh iterator over ``data``'s chunks."""
    if callable(data) and not hasattr(data, "__iter__"):
        return data
    if not hasattr(data, "__iter__"):
        raise TypeError(f"{fn}: data must be a tensor, numpy array, nn.Module or an iterable of "
                        f"(logits, labels) chunks, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(
            f"{fn}: data is a one-shot iterator ({type(data).__name__}); the fit reads the chunks "
            "once per pass, so pass a re-iterable (a list, a DataLoader) or a zero-argument "
            "callable that returns a fresh iterator")
    return lambda: iter(data)


def chunks(source: Source) -> Iterator:
    """The chunks of a source (a fresh iterator)."""
    return iter(source) if isinstance(source, list) else source()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU without either."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors in x (nested lists, tuples, dicts) moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def collect_logits(fn: str, model: torch.nn.Module, loader: Iterable, progress: bool,
                   allow_empty: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The model's logits on every batch of ``loader`` (eval mode, no_grad, the model's device;
    the training mode is restored), as one chunk [(logits (N, C), labels (N,))]. An empty
    loader is an error unless ``allow_empty`` (then [])."""
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{fn}: loader must be an iterable of (inputs, labels) batches, got "
                        f"{type(loader).__name__}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        from tqdm.auto import tqdm
        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(loader, total=total, desc="softcal: collecting logits", unit="batch",
                   disable=not progress, leave=False)
        with torch.no_grad():
            for i, batch in enumerate(bar):
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise TypeError(f"{fn}: loader batch {i} must be a tuple (inputs, labels, ...), "
                                    f"got {type(batch).__name__}")
                inputs, y = batch[0], batch[1]
                out = model(to_device(inputs, device))
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"{fn}: the model must return a logits tensor, got {type(out).__name__}")
                logits.append(out.detach())
                labels.append(as_tensor(y).to(out.device))
    finally:
        model.train(was_training)
    if not logits:
        if allow_empty:  # distributed: this rank has no rows, the others may
            return []
        raise ValueError(f"{fn}: the loader yielded no batches (empty input)")
    return [(torch.cat(logits), torch.cat(labels))]


def fit_source(fn: str, data: Any, labels: Any, model: Optional[torch.nn.Module], progress: bool,
               distributed: bool = False) -> Source:
    """The source of ``fit(data, labels)`` for a calibrator that wraps ``model`` (or None):
    fit(logits, labels), fit(model, loader), fit(loader) with a wrapped model, or fit(chunks).
    ``distributed``: a rank may have no rows."""
    if isinstance(data, torch.nn.Module):
        if labels is None:
            raise ValueError(f"{fn}: fit(model, loader) needs a loader as the second argument")
        return collect_logits(fn, data, labels, progress, distributed)
    if is_array(data):
        if labels is None:
            raise ValueError(f"{fn}: labels is required with logits (fit(logits, labels))")
        return [(data, labels)]
    if labels is not None:
        raise TypeError(
            f"{fn}: data must be a tensor, numpy array, nn.Module or an iterable of "
            f"(logits, labels) chunks, got {type(data).__name__} with labels")
    if model is not None:
        return collect_logits(fn, model, data, progress, distributed)
    return chunk_source(fn, data)


def check_chunk(fn: str, i: int, chunk: Any, classes: Optional[int], where: str
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The checks of chunk ``i`` that do not read the logits' values: a pair, floating logits
    (N, C) with C >= 1 (and C == ``classes`` when given), integer labels (N,) or (N, 1) in
    [0, C) on the logits' device. Returns (logits, labels (N,)). ``where``: text for messages
    (" (chunk 3)" or "")."""
    if not isinstance(chunk, (list, tuple)) or len(chunk) != 2:
        raise TypeError(f"{fn}: chunk {i} must be a pair (logits, labels), got {type(chunk).__name__}")
    logits, labels = as_tensor(chunk[0]), as_tensor(chunk[1])
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{fn}: logits must be floating point (float16/bfloat16/float32/float64), "
                        f"got dtype {logits.dtype}{where}")
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be 2-D (N, C), got shape {tuple(logits.shape)}{where}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"{fn}: labels must be integer class indices, got dtype {labels.dtype}{where}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.dim() != 1:
        raise ValueError(f"{fn}: labels must have shape (N,), got {tuple(labels.shape)}{where}")
    n, c = logits.shape
    if labels.shape[0] != n:
        raise ValueError(f"{fn}: labels has {labels.shape[0]} rows but logits has {n}{where}")
    if c < 1:
        raise ValueError(f"{fn}: logits has 0 classes (shape {tuple(logits.shape)}){where}")
    if classes is not None and c != classes:
        raise ValueError(f"{fn}: chunk {i} has {c} classes but chunk 0 has {classes}")
    labels = labels.to(logits.device)
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= c:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{fn}: labels must be in [0, {c - 1}] for {c} classes, got label {bad}{where}")
    return logits, labels


def check_values(fn: str, logits: torch.Tensor, labels: torch.Tensor, where: str
                 ) -> torch.Tensor:
    """Raise for NaN or +inf logits and for a label whose logit is -inf (infinite NLL), naming
    the first bad row; return the per-row bool "the label holds the row's maximum" (one read
    of the logits)."""
    mx = logits.amax(1)
    if bool(torch.isnan(mx).any()):
        row = int(torch.isnan(mx).nonzero()[0, 0])
        raise ValueError(f"{fn}: logits contain NaN (first in row {row}){where}")
    if bool(torch.isposinf(mx).any()):
        row = int(torch.isposinf(mx).nonzero()[0, 0])
        raise ValueError(f"{fn}: logits contain +inf (first in row {row}){where}")
    xy = logits.gather(1, labels.reshape(-1, 1).long()).reshape(-1)
    if bool(torch.isneginf(xy).any()):
        row = int(torch.isneginf(xy).nonzero()[0, 0])
        raise ValueError(f"{fn}: the label's logit is -inf in row {row}{where} (NLL is infinite)")
    return xy >= mx


def warn_if_probabilities(fn: str, x: torch.Tensor, stacklevel: int = 7) -> None:
    """Warn when every row of x (a few thousand rows) is in [0, 1] and sums to 1."""
    if x.shape[1] < 2:
        return
    head = x[:8].float()  # most logits fail on the first rows: no pass over the others
    if not (bool(((head >= 0) & (head <= 1)).all()) and bool(((head.sum(1) - 1).abs() < 1e-3).all())):
        return
    xf = x.float()
    if bool(((xf >= 0) & (xf <= 1)).all()) and bool(((xf.sum(1) - 1).abs() < 1e-3).all()):
        warnings.warn(
            f"{fn}: the input looks like probabilities (every row is in [0, 1] and sums to 1), not "
            "logits. Temperature scaling divides logits; pass torch.log(probs) (log-probabilities "
            "are valid logits), or use `softcal calibrate --probs` on the command line.",
            UserWarning, stacklevel=stacklevel)
