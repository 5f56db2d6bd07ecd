"""Releasing the references that torch keeps to a process group (issue 18, item 15).

A gloo process group that is still referenced when ``destroy_process_group`` runs is destroyed
later, during the interpreter's finalisation, where a gloo worker thread that still drops its
last collective's tensors (Python objects: it needs the GIL) is killed inside a noexcept
destructor: the process aborts after a correct run ("terminate called without an active
exception", SIGABRT; tests/distributed/test_distributed.py::test_two_ranks_dtensor about one run in six).
Three kinds of references were found; two are torch's, from DTensor:

1. ``torch.distributed.nn.functional`` binds ``group.WORLD`` as the default value of ten
   functions' ``group`` argument when it is imported. DTensor imports it lazily (through
   ``torch.distributed._shard``) at the first ``distribute_tensor``, which is after
   ``init_process_group``: ten references to the world group for the life of the process.
   Importing it before any group exists binds ``None`` instead: this module does so when
   softcal.distributed is imported.
2. DTensor's caches keep every mesh they saw, and a mesh keeps its groups: the sharding
   propagator's (the C++ dispatch fast path's, ``torch._C._clear_DTensor_sharding_propagator_cache``;
   the Python ``propagate_op_sharding``, a per-thread lru_cache whose values hold the output
   specs; ``_propagate_tensor_meta_cached``) and the redistribution planner's
   (``_planner_cache``, whose values hold the DeviceMesh under a weakly referenced key, and the
   ``functools.cache`` of ``_gen_transform_infos``, keyed by specs that hold it).
   ``release_group_references`` clears them; call it before ``destroy_process_group``.
3. Reference cycles through an exception's traceback (a frame that keeps the exception it
   raised, e.g. after a ``pytest.raises``), whose frames hold the group: freed by the garbage
   collector only, possibly during finalisation. softcal's agreement (``_agree``) breaks its
   own; ``release_group_references`` runs the collector for the rest.

(CalibrationMetrics had the same failure from a strong reference of its own, fixed in 4d92a2f
by a weak one.)
"""

from __future__ import annotations

import sys

__all__ = ["import_before_groups", "release_group_references"]


def import_before_groups() -> None:
    """Import ``torch.distributed.nn.functional`` now, while no process group exists (see 1.
    above); a no-op when it is imported already or torch.distributed is unavailable."""
    if "torch.distributed.nn.functional" in sys.modules:
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and not dist.is_initialized():
            import torch.distributed.nn.functional  # noqa: F401
    except Exception:  # noqa: BLE001 (an optional precaution: never fail softcal's import)
        pass


def release_group_references() -> None:
    """Collect reference cycles and clear DTensor's caches, which keep DeviceMeshes and so their
    process groups alive (see 2. and 3. above). Call it before
    ``torch.distributed.destroy_process_group``; later DTensor calls refill the caches. A no-op
    for what this torch does not have."""
    import gc

    import torch

    native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if native is not None:
        native()
    api = sys.modules.get("torch.distributed.tensor._api")
    dispatcher = getattr(getattr(api, "DTensor", None), "_op_dispatcher", None)
    propagator = getattr(dispatcher, "sharding_propagator", None)
    _cache_clear(getattr(propagator, "propagate_op_sharding", None))
    _cache_clear(getattr(type(propagator), "_propagate_tensor_meta_cached", None))
    redistribute = sys.modules.get("torch.distributed.tensor._redistribute")
    clear = getattr(redistribute, "clear_redistribute_planner_cache", None)
    if clear is not None:
        clear()
    _cache_clear(getattr(redistribute, "_gen_transform_infos", None))
    gc.collect()  # (after the caches: what they held may be cyclic)


def _cache_clear(cached) -> None:
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
