"""The ranks of a process group agree on a call before its first collective.

Every distributed entry point of softcal (:func:`softcal.distributed.vocab_parallel_cross_entropy`,
``TemperatureScaler.fit(group=...)``, ``softcal.metrics.CalibrationMetrics.compute`` with a
group) runs its local argument checks, then ONE small collective in which every rank publishes

* the outcome of its checks (the exception's type and message, or none), and
* the call's signature: the values every rank must pass alike (reduction, smoothing,
  temperature, bins, fit options, the number of rows where every rank holds every row, ...) and
  the values each rank contributes (its slice of the classes, its number of rows).

Then every rank knows the same facts, so every rank raises the same error together (a rank's
failed check, a disagreement, a rank in another call) or none does, and no later collective is
entered by only some ranks: none aborts (gloo aborts the process on a size mismatch), none waits
forever, and the group stays usable for the user's next collective.

The collective is an all-reduce (sum) of a (world, 96) int64 tensor in which each rank fills its
own row (768 bytes a rank; every backend reduces int64, NCCL on the current CUDA device). A row
is [magic, hash of the call and its field names, number of fields, error code, message length,
up to 24 fields as int64 words, the error message in UTF-8 (up to 536 bytes)]: a fixed size, so
that ranks in different calls still meet in a collective of the same size and see that they
differ.

Use (this is also the API for new distributed entry points, such as other calibrators)::

    def checks(sig):                      # local checks only: no collective in here
        ...validate, raise ValueError/TypeError naming the argument...
        sig.same("reduction", red, show=REDUCTIONS)   # must be equal on every rank
        sig.each("rows", n)                           # gathered: one value per rank
        return what_the_call_needs
    value, agreed = agree_on(fn, group, checks)       # raises on every rank, or on none
    agreed.each("rows")                               # [rows of rank 0, rank 1, ...]

Not thread-safe across concurrent calls on the same group (like every collective).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

__all__ = ["Agreed", "Signature", "agree", "agree_on", "all_reduce_checked", "target_checksum"]

WORDS = 96                    # int64 words per rank
_HEAD = 5                     # magic, call hash, field count, error code, message bytes
_MAGIC = 0x536F667443616C31   # "SoftCal1"
_NONE = -(2 ** 63)            # the word of None
_ERRORS = (ValueError, TypeError, RuntimeError, IndexError, NotImplementedError)
MAX_FIELDS = 24
_MSG_BYTES = (WORDS - _HEAD - MAX_FIELDS) * 8

T = TypeVar("T")


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _float_word(v: float) -> int:
    v = float(v) + 0.0  # -0.0 -> 0.0
    return struct.unpack("<q", struct.pack("<d", v))[0]


def _word_float(w: int) -> float:
    return struct.unpack("<d", struct.pack("<q", w))[0]


def target_checksum(target: torch.Tensor) -> int:
    """A position-dependent checksum of an integer tensor (its values and their order), the same
    on every device and rank for equal tensors: sum_i (t_i + 1) * h(i) modulo 2^64 with a
    multiplicative hash h (one pass over the tensor, one device synchronisation)."""
    t = target.reshape(-1)
    if t.numel() == 0:
        return 0
    i = torch.arange(t.numel(), device=t.device, dtype=torch.int64)
    h = (i * 2654435761 + 97) % 2147483647 + 1            # in [1, 2^31)
    v = (t.to(torch.int64) + 1) * h                      # int64 arithmetic wraps
    return int(v.sum())


class Signature:
    """The fields of one rank's record; filled by the local checks (see the module docstring).

    ``same(name, value)``: every rank must pass an equal value; ``each(name, value)``: one value
    per rank, returned by :meth:`Agreed.each`. Values: None, bool, int (int64), float (compared
    bit for bit, -0.0 == 0.0), or str/torch.dtype with ``show`` listing the possible values (an
    index is sent; a value outside ``show`` is sent as its hash and shown as "another value").
    """

    def __init__(self, fn: str) -> None:
        self.fn = fn
        self.names: List[str] = []
        self.kinds: List[str] = []
        self.words: List[int] = []
        self.same_fields: List[bool] = []
        self.shows: List[Optional[Sequence[Any]]] = []

    def _add(self, name: str, value: Any, same: bool, show: Optional[Sequence[Any]],
             kind: Optional[str]) -> None:
        if len(self.names) >= MAX_FIELDS:
            raise RuntimeError(f"{self.fn}: internal error, more than {MAX_FIELDS} agreed fields")
        if name in self.names:
            raise RuntimeError(f"{self.fn}: internal error, field {name!r} given twice")
        if show is not None:
            kind = "choice"
        elif kind is None:
            kind = ("bool" if isinstance(value, bool) else "int" if isinstance(value, int) else
                    "float" if isinstance(value, float) else "int" if value is None else "")
        if value is None:
            word = _NONE
        elif kind == "choice":
            word = list(show).index(value) if value in list(show) else (1 << 40) + _crc(str(value))
        elif kind == "bool" and isinstance(value, bool):
            word = int(value)
        elif kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            if not -(2 ** 63) < value < 2 ** 63:
                raise ValueError(f"{self.fn}: {name} = {value} does not fit in int64")
            word = int(value)
        elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            word = _float_word(value)
        else:
            raise RuntimeError(f"{self.fn}: internal error, field {name!r} of kind {kind!r} has "
                               f"type {type(value).__name__}")
        self.names.append(name)
        self.kinds.append(kind)
        self.words.append(word)
        self.same_fields.append(same)
        self.shows.append(show)

    def same(self, name: str, value: Any, show: Optional[Sequence[Any]] = None, *,
             kind: Optional[str] = None) -> None:
        """A value every rank of the group must pass alike. ``kind`` ("int", "float", "bool";
        default: the value's type) is needed where the value may be None on some ranks."""
        self._add(name, value, True, show, kind)

    def each(self, name: str, value: Any, show: Optional[Sequence[Any]] = None, *,
             kind: Optional[str] = None) -> None:
        """A value of this rank (gathered, for the caller's own checks)."""
        self._add(name, value, False, show, kind)


class Agreed:
    """The gathered records: one value per rank for every field (see :meth:`each`)."""

    def __init__(self, fn: str, world: int, rank: int, names: List[str],
                 values: Dict[str, List[Any]]) -> None:
        self.fn, self.world, self.rank, self.names = fn, world, rank, names
        self._values = values

    def each(self, name: str) -> List[Any]:
        """The field's value on every rank, in rank order."""
        return self._values[name]

    def value(self, name: str) -> Any:
        """The value of a ``same`` field (equal on every rank)."""
        return self._values[name][0]


def _decode(kind: str, word: int, show: Optional[Sequence[Any]]) -> Any:
    if word == _NONE:
        return None
    if kind == "choice":
        return show[word] if 0 <= word < len(show) else _Other()
    if kind == "bool":
        return bool(word)
    if kind == "float":
        return _word_float(word)
    return word


class _Other:
    def __repr__(self) -> str:
        return "another value"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Other)

    def __hash__(self) -> int:
        return 0


def _ranks(rs: List[int]) -> str:
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(str(r) for r in rs)


def _show(v: Any) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return repr(v)


def _comm_device(group: Any) -> torch.device:
    from .distributed import comm_device

    return comm_device(group)


def agree_on(fn: str, group: Any, checks: Callable[[Signature], T]
             ) -> Tuple[Optional[T], Agreed]:
    """Run ``checks(sig)`` (local only), then the one collective; return (what checks returned,
    the :class:`Agreed` records). Raises on every rank of the group together, with the same type
    and message: a rank's failed check (ValueError/TypeError/RuntimeError/IndexError/
    NotImplementedError keep their type, any other Exception is a RuntimeError), a ``same``
    field that differs, or a rank in another call. KeyboardInterrupt and SystemExit propagate
    at once (the other ranks then wait in the collective, as they would for a dead process)."""
    from .distributed import _dist

    dist = _dist()
    sig = Signature(fn)
    error: Optional[BaseException] = None
    out: Optional[T] = None
    try:
        out = checks(sig)
    except Exception as exc:  # published, then raised on every rank (below)
        error = exc
    try:
        return out, agree(fn, group, sig, error, dist)
    finally:
        del error  # (no frame <-> traceback cycle that keeps the group alive until a gc)


def agree(fn: str, group: Any, sig: Signature, error: Optional[BaseException] = None,
          dist: Any = None) -> Agreed:
    """The collective of :func:`agree_on` for a filled ``sig`` and this rank's ``error``
    (None: its checks passed). For callers whose error arises elsewhere, e.g. after a pass
    whose flags said that some rank failed."""
    if dist is None:
        from .distributed import _dist

        dist = _dist()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if world < 0 or rank < 0:
        raise RuntimeError(f"{fn}: this process is not a member of the given process group")
    call = _crc(fn + "|" + "|".join(sig.names)) if error is None else 0
    record = [_MAGIC, call, len(sig.words) if error is None else 0, 0, 0]
    msg = b""
    if error is not None:
        code = next((k + 1 for k, cls in enumerate(_ERRORS) if type(error) is cls), 0)
        if code == 0:
            code = next((k + 1 for k, cls in enumerate(_ERRORS) if isinstance(error, cls)),
                        len(_ERRORS) + 1)
        text = str(error) if code <= len(_ERRORS) else f"{type(error).__name__}: {error}"
        msg = text.encode("utf-8")
        if len(msg) > _MSG_BYTES:
            msg = msg[:_MSG_BYTES - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
        record[3], record[4] = code, len(msg)
        words: List[int] = []
    else:
        words = list(sig.words)
    record += words + [0] * (MAX_FIELDS - len(words))
    padded = msg + b"\0" * (_MSG_BYTES - len(msg))
    record += list(struct.unpack(f"<{_MSG_BYTES // 8}q", padded))
    buf = torch.zeros(world, WORDS, dtype=torch.int64)
    buf[rank] = torch.tensor(record, dtype=torch.int64)
    dev = _comm_device(group)
    dbuf = buf.to(dev)
    dist.all_reduce(dbuf, op=dist.ReduceOp.SUM, group=group)
    rows = dbuf.cpu().tolist()

    # 1. a rank whose checks failed: its error, on every rank
    failed = [r for r in range(world) if rows[r][0] == _MAGIC and rows[r][3] != 0]
    if failed:
        r0 = failed[0]
        code, n = rows[r0][3], rows[r0][4]
        raw = struct.pack(f"<{_MSG_BYTES // 8}q", *rows[r0][_HEAD + MAX_FIELDS:])[:n]
        text = raw.decode("utf-8", "replace")
        cls = _ERRORS[code - 1] if 1 <= code <= len(_ERRORS) else RuntimeError
        where = (f"rank {r0} of the group of {world}" if len(failed) == 1 else
                 f"{_ranks(failed)} of the group of {world} failed their checks; this is rank "
                 f"{r0}'s error")
        common = cls(f"{text} [{where}; every rank raises this error]")
        try:
            if error is not None:
                raise common from error
            raise common
        finally:
            del common, error  # (no frame <-> traceback cycle, as in agree_on)
    # 2. every rank in this same call
    bad = [r for r in range(world) if rows[r][0] != _MAGIC or rows[r][1] != call
           or rows[r][2] != len(sig.words)]
    if bad:
        raise RuntimeError(
            f"{fn}: {_ranks(bad)} of the group of {world} are not in this call (another softcal "
            f"call, or another softcal version); every rank of the group must call {fn} together")
    # 3. the fields
    values: Dict[str, List[Any]] = {}
    differ = []
    for k, name in enumerate(sig.names):
        vals = [_decode(sig.kinds[k], rows[r][_HEAD + k], sig.shows[k]) for r in range(world)]
        values[name] = vals
        if sig.same_fields[k] and any(rows[r][_HEAD + k] != rows[0][_HEAD + k]
                                      for r in range(world)):
            groups: Dict[int, List[int]] = {}
            for r in range(world):
                groups.setdefault(rows[r][_HEAD + k], []).append(r)
            parts = [f"{_show(vals[rs[0]])} on {_ranks(rs)}" for rs in groups.values()]
            differ.append(f"{name}: " + ", ".join(parts))
    if differ:
        raise ValueError(
            f"{fn}: the ranks of the group disagree on " + "; on ".join(differ) +
            " (every rank of the group must pass the same)")
    return Agreed(fn, world, rank, list(sig.names), values)


def all_reduce_checked(fn: str, group: Any, values: torch.Tensor,
                       error: Optional[BaseException]) -> torch.Tensor:
    """Sum the float64 vector ``values`` (the same length on every rank; zeros where this rank
    failed) over the group in one all-reduce, with this rank's error flag beside it. When some
    rank's ``error`` is set, every rank raises that rank's error (one more small collective,
    :func:`agree`), so that the ranks stay in step. For the statistics of a pass over data whose
    checks run while it is read (a calibrator's fit)."""
    from .distributed import all_reduce

    packed = torch.cat([values.detach().to(torch.float64).cpu().reshape(-1),
                        torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64)])
    packed = all_reduce(packed, "sum", group)
    if float(packed[-1]) > 0:
        agree(fn, group, Signature(fn), error)
        raise RuntimeError(f"{fn}: internal error, a rank failed but no error was agreed")
    return packed[:-1]
