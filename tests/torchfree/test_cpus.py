"""engine.cpus: the CPUs a process may use, from its affinity and its cgroup's CPU quota (fake cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine import cpus


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
    assert cpus.cgroup_cpu_quota(proc, root) == quota


def test_no_proc_file_means_no_quota(tmp_path: Path) -> None:
    assert cpus.cgroup_cpu_quota(tmp_path / "missing", tmp_path) is None


def test_a_cgroup_name_that_is_not_utf8_still_finds_the_quota(tmp_path: Path) -> None:
    proc, root = cgroup_tree(tmp_path, "", {"cpu.max": "200000 100000"})
    proc.write_bytes(b"0::/caf\xe9.scope\n")  # the kernel takes any bytes; not mounted here: the mount's own quota
    assert cpus.cgroup_cpu_quota(proc, root) == 2.0
    (root / os.fsdecode(b"caf\xe9.scope")).mkdir()
    (root / os.fsdecode(b"caf\xe9.scope") / "cpu.max").write_text("50000 100000")
    assert cpus.cgroup_cpu_quota(proc, root) == 0.5


def test_a_cgroup_folder_it_may_not_search_counts_as_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root the test cannot be refused by file modes; a sandbox's or security profile's EACCES, injected:
    proc, root = cgroup_tree(tmp_path, "0::/kubepods/pod1\n", {"cpu.max": "300000 100000", "kubepods/pod1/cpu.max": "100000 100000"})
    real_is_dir = Path.is_dir

    def is_dir(path: Path) -> bool:
        if path.name == "pod1":
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_dir(path)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    assert cpus.cgroup_cpu_quota(proc, root) == 3.0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux affinity")
@pytest.mark.parametrize(
    ("affinity", "quota", "cores"), [(8, 1.5, 1), (8, 2.9, 2), (8, 0.5, 1), (4, 16.0, 4), (8, None, 8), (8, 2.0, 2), (8, 3.0, 3)]
)
def test_available_cores_is_the_affinity_capped_by_the_quota(
    monkeypatch: pytest.MonkeyPatch, affinity: int, quota: float | None, cores: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: quota)
    assert cpus.available_cores() == cores


def test_too_many_threads_names_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import session

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    for module in (cpus, session):
        monkeypatch.setattr(module, "cgroup_cpu_quota", lambda: 0.5)
    assert session.too_many_threads(4) is None
    assert session.too_many_threads(5) == (
        "threads 5 on 1 CPU cores (this cgroup's CPU quota: 0.5 CPUs): at most 4 (4 per core); "
        "threads beyond the cores only wait for each other"
    )


def test_sessions_take_one_thread_per_cpu_of_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    # ONNX Runtime would size its pool by the machine's cores, which a quota does not change.
    from engine.session import SessionSettings

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: 2.0)
    assert SessionSettings().options().intra_op_num_threads == 2
