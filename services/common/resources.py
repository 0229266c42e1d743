"""What the container really has: CPUs from the cgroup quota and affinity, not
the host's count; memory from the cgroup limit and MemAvailable; the CPU's model
and instruction-set flags. And how the process keeps the memory it frees."""

import ctypes
import os
import platform


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its flags ("avx2", "avx512_bf16", ...), from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in _read("/proc/cpuinfo").splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields.get("model name") or platform.processor() or "unknown", frozenset(fields.get("flags", "").split())


def available_cpus() -> int:
    count = len(os.sched_getaffinity(0))
    quota = _read("/sys/fs/cgroup/cpu.max").split()  # cgroup v2: "max 100000" or "200000 100000"
    if len(quota) == 2 and quota[0] != "max":
        count = min(count, max(1, int(quota[0]) // int(quota[1])))
    else:
        v1_quota, v1_period = (
            _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
            _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        )
        if v1_quota.lstrip("-").isdigit() and int(v1_quota) > 0 and v1_period.isdigit():
            count = min(count, max(1, int(v1_quota) // int(v1_period)))
    return max(1, count)


def available_memory_bytes() -> int:
    available = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    limit, used = _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
    if limit.isdigit() and used.isdigit():
        headroom = int(limit) - int(used)
        available = min(available, headroom) if available else headroom
    return available or 2 << 30


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
FREED_MEMORY_KEPT_BYTES = 256 << 20


def keep_freed_memory_for_reuse() -> bool:
    """Freed blocks of up to 256 MiB stay in one heap for the next allocation instead of going
    back to the kernel. By default glibc maps every block over 32 MiB afresh (in a thread's own
    arena, over its 64 MiB heap) and unmaps it when freed, so a network whose activations are
    that big (38-76 MB a layer on a 512-pixel tile) faults in every page again on every tile.
    Memory stays at a request's peak, which a pod is sized for anyway. Call it at start, before
    other threads allocate. False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_THRESHOLD, FREED_MEMORY_KEPT_BYTES),
        (_M_TRIM_THRESHOLD, FREED_MEMORY_KEPT_BYTES),
    )
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
