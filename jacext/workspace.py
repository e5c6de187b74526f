"""The CPU workspace: the memory of jacext's freed carries, temporaries and gradients, kept for
the next call (csrc/workspace.h).

A fresh tensor of more than a few hundred KiB is mapped from the system and every page is
faulted in on first touch; freed, it goes back. At everyday widths that costs more than the GEMMs
(docs/benchmarks.md), every training step again. jacext's CPU ops allocate
from a cache of their own freed blocks instead, so a second identical step touches no new page;
the rest of the process's memory and its malloc settings are left alone. Freed blocks are kept up
to a limit (default: an eighth of physical memory, at most 4 GiB)."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops)

__all__ = ["workspace_stats", "set_workspace_limit", "release_workspace"]


def workspace_stats() -> dict:
    """{'cached_bytes', 'in_use_bytes', 'limit_bytes', 'hits', 'misses'}: memory kept for reuse,
    memory held by live tensors from the workspace, the limit on kept memory, and how many
    allocations were served from the cache or needed new memory."""
    cached, in_use, limit, hits, misses = torch.ops.jacext.workspace_stats()
    return {"cached_bytes": cached, "in_use_bytes": in_use, "limit_bytes": limit, "hits": hits, "misses": misses}


def set_workspace_limit(limit_bytes: int) -> None:
    """Keep at most `limit_bytes` of freed memory for reuse (0: keep none, every tensor goes back to
    the system when freed); cached blocks beyond the new limit are freed now."""
    if not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be a non-negative integer, got {limit_bytes!r}")
    torch.ops.jacext.workspace_set_limit(limit_bytes)


def release_workspace() -> None:
    """Give all kept memory back to the system (live tensors are not affected)."""
    torch.ops.jacext.workspace_release()
