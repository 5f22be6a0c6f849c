"""engine.resources: the CPUs and memory a process may use, from its affinity and its cgroup's CPU quota and
memory limit (fake cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine import resources


def cgroup_tree(tmp_path: Path, proc_lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup with `proc_lines` and a cgroup mount with `files` (path under the mount -> text)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_lines)
    return proc, root


@pytest.mark.parametrize(
    ("proc_lines", "files", "quota"),
    [
        # cgroup v2 in a container (docker --cpus 1.5): its own cgroup is the mount
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        # v2 on a host (Kubernetes pod): the smallest quota on the way up counts
        ("0::/kubepods/pod1/ctr\n", {"kubepods/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "100000 100000",
                                     "kubepods/pod1/ctr/cpu.max": "400000 100000"}, 1.0),
        # v2, the host's path not mounted here (cgroup namespace): the mount is this container's cgroup
        ("0::/system.slice/docker-abc.scope\n", {"cpu.max": "200000 100000"}, 2.0),
        # cgroup v1 (docker on older hosts), cpu joined with cpuacct
        ("12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
                                                              "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ("3:cpu:/a\n", {"cpu/a/cpu.cfs_quota_us": "300000", "cpu/a/cpu.cfs_period_us": "100000",
                        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
        # no quota
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
        ("0::/\n", {"cpu.max": "garbage"}, None),
        ("0::/\n", {}, None),
    ],
    ids=["v2-container", "v2-nested", "v2-namespace", "v1-container", "v1-nested", "v2-max", "v1-none", "v2-garbage", "v2-absent"],
)
def test_cgroup_cpu_quota(tmp_path: Path, proc_lines: str, files: dict[str, str], quota: float | None) -> None:
    proc, root = cgroup_tree(tmp_path, proc_lines, files)
    assert resources.cgroup_cpu_quota(proc, root) == quota


def test_no_proc_file_means_no_quota(tmp_path: Path) -> None:
    assert resources.cgroup_cpu_quota(tmp_path / "missing", tmp_path) is None


def test_a_cgroup_name_that_is_not_utf8_still_finds_the_quota(tmp_path: Path) -> None:
    proc, root = cgroup_tree(tmp_path, "", {"cpu.max": "200000 100000"})
    proc.write_bytes(b"0::/caf\xe9.scope\n")  # the kernel takes any bytes; not mounted here: the mount's own quota
    assert resources.cgroup_cpu_quota(proc, root) == 2.0
    (root / os.fsdecode(b"caf\xe9.scope")).mkdir()
    (root / os.fsdecode(b"caf\xe9.scope") / "cpu.max").write_text("50000 100000")
    assert resources.cgroup_cpu_quota(proc, root) == 0.5


def test_a_cgroup_folder_it_may_not_search_counts_as_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root the test cannot be refused by file modes; a sandbox's or security profile's EACCES, injected:
    proc, root = cgroup_tree(tmp_path, "0::/kubepods/pod1\n", {"cpu.max": "300000 100000", "kubepods/pod1/cpu.max": "100000 100000"})
    real_is_dir = Path.is_dir

    def is_dir(path: Path) -> bool:
        if path.name == "pod1":
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_dir(path)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    assert resources.cgroup_cpu_quota(proc, root) == 3.0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux affinity")
@pytest.mark.parametrize(
    ("affinity", "quota", "cores"), [(8, 1.5, 1), (8, 2.9, 2), (8, 0.5, 1), (4, 16.0, 4), (8, None, 8), (8, 2.0, 2), (8, 3.0, 3)]
)
def test_available_cores_is_the_affinity_capped_by_the_quota(
    monkeypatch: pytest.MonkeyPatch, affinity: int, quota: float | None, cores: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(resources, "cgroup_cpu_quota", lambda: quota)
    assert resources.available_cores() == cores


def test_too_many_threads_names_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import session

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    for module in (resources, session):
        monkeypatch.setattr(module, "cgroup_cpu_quota", lambda: 0.5)
    assert session.too_many_threads(4) is None
    assert session.too_many_threads(5) == (
        "threads 5 on 1 CPU core (this cgroup's CPU quota: 0.5 CPUs): at most 4 (4 per core); "
        "threads beyond the cores only wait for each other"
    )
    assert session.too_many_threads(2, processes=2) is None
    assert session.too_many_threads(3, processes=2) == (
        "threads 3 in each of 2 processes on this machine (6 in all) on 1 CPU core (this cgroup's CPU quota: 0.5 CPUs): "
        "at most 4 in all (4 per core); threads beyond the cores only wait for each other"
    )


def test_sessions_take_one_thread_per_cpu_of_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    # ONNX Runtime would size its pool by the machine's cores, which a quota does not change.
    from engine.session import SessionSettings

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(resources, "cgroup_cpu_quota", lambda: 2.0)
    assert SessionSettings().options().intra_op_num_threads == 2


GIB = 2**30


@pytest.mark.parametrize(
    ("proc_lines", "files", "limit", "headroom"),
    [
        # v2 in a container (docker --memory 4g): 1 GiB held, of which 0.25 GiB is file cache no process maps
        ("0::/\n", {"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB}\n",
                    "memory.stat": f"anon 1\nactive_file {GIB // 8}\ninactive_file {GIB // 4}\nfile_mapped {GIB // 8}\n"},
         4 * GIB, 3 * GIB + GIB // 4),
        # v2 nested (a Kubernetes pod's limit above its container's): the smallest room counts
        ("0::/pod/ctr\n", {"pod/memory.max": f"{2 * GIB}", "pod/memory.current": f"{GIB}",
                           "pod/ctr/memory.max": f"{8 * GIB}", "pod/ctr/memory.current": f"{GIB // 2}"}, 2 * GIB, GIB),
        # cgroup v1: the root's "no limit", a child's limit, cache of ended processes not counted as held
        ("4:memory:/job\n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                             "memory/job/memory.limit_in_bytes": f"{3 * GIB}", "memory/job/memory.usage_in_bytes": f"{GIB}",
                             "memory/job/memory.stat": f"cache {GIB}\ntotal_active_file {GIB // 2}\n"
                                                       f"total_inactive_file {GIB // 2}\ntotal_mapped_file 0\n"}, 3 * GIB, 3 * GIB),
        # held memory that cannot be read: the limit is known, the room is not
        ("0::/\n", {"memory.max": f"{GIB}"}, GIB, None),
        # no limit, or none to be read
        ("0::/\n", {"memory.max": "max\n", "memory.current": "5"}, None, None),
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"}, None, None),
        ("0::/\n", {"memory.max": "garbage"}, None, None),
        ("0::/\n", {}, None, None),
    ],
    ids=["v2-container", "v2-nested", "v1-nested", "v2-no-usage", "v2-max", "v1-none", "v2-garbage", "v2-absent"],
)
def test_cgroup_memory_limit_and_headroom(
    tmp_path: Path, proc_lines: str, files: dict[str, str], limit: int | None, headroom: int | None
) -> None:
    proc, root = cgroup_tree(tmp_path, proc_lines, files)
    assert resources.cgroup_memory_limit(proc, root) == limit
    assert resources.cgroup_memory_headroom(proc, root) == headroom


def test_memory_is_the_machines_capped_by_the_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n")
    monkeypatch.setattr(resources, "cgroup_memory_limit", lambda: None)
    monkeypatch.setattr(resources, "cgroup_memory_headroom", lambda: None)
    assert (resources.memory_total(meminfo), resources.memory_available(meminfo)) == (24000000 * 1024, 20000000 * 1024)
    monkeypatch.setattr(resources, "cgroup_memory_limit", lambda: 2 * GIB)  # a container on a big host
    monkeypatch.setattr(resources, "cgroup_memory_headroom", lambda: GIB)
    assert (resources.memory_total(meminfo), resources.memory_available(meminfo)) == (2 * GIB, GIB)
    assert resources.memory_available(tmp_path / "absent") == GIB  # not Linux's /proc: the cgroup still counts


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="Linux /proc")
def test_this_machines_memory_is_read() -> None:
    total, available = resources.memory_total(), resources.memory_available()
    assert total is not None and available is not None and 0 <= available <= total  # 0: a cgroup at its limit
