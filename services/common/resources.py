"""What the container really has: CPUs from the cgroup quota and affinity, not
the host's count; memory from the cgroup limit and MemAvailable; the CPU's model
and instruction-set flags."""

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
