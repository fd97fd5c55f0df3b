"""The local backend's pure parts: bwrap argv, limits plan, cgroup plans and parsers, registry records."""

from __future__ import annotations

import pytest

from rayflow.errors import ConfigError
from rayflow.sandbox.cgroups import (
    counter,
    find_hierarchies,
    parse_mountinfo,
    parse_proc_cgroup,
    plan_v1,
    plan_v2,
)
from rayflow.sandbox.local_backend import (
    SANDBOX_LIB,
    ArgvFds,
    HostLayout,
    Record,
    bwrap_argv,
    passwd_lines,
    plan_limits,
)
from rayflow.sandbox.spec import MIB, Limits, Mount, NetworkPolicy, SandboxSpec

LAYOUT = HostLayout(
    python="/opt/py/bin/python3.11",
    python_prefix="/opt/py",
    packages=(("/src/rayflow", "rayflow"), ("/venv/site-packages/msgpack", "msgpack")),
    system_dirs=("/usr",),
    system_links=(("/bin", "usr/bin"), ("/lib", "usr/lib")),
    privileged=True,
)
FDS = ArgvFds(info=5, block=6, passwd=7, group=8)
UID = 1_700_000_042


def argv_for(
    spec: SandboxSpec, layout: HostLayout = LAYOUT, cgroup: tuple[str, ...] | None = ()
) -> list[str]:
    applied = ("memory", "swap", "pids", "cpu") if cgroup == () else cgroup
    plan = plan_limits(spec.limits, applied)
    return bwrap_argv(spec, layout, uid=UID, fds=FDS, plan=plan, bwrap="/usr/bin/bwrap")


def pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == option]


def sandbox_part(argv: list[str]) -> list[str]:
    return argv[: argv.index("--")]


def test_argv_unshares_every_namespace_but_user_when_root() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"):
        assert flag in argv
    assert "--unshare-user" not in argv
    assert "--share-net" not in argv


def test_argv_dies_with_parent_in_a_new_session() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    assert "--die-with-parent" in argv and "--new-session" in argv


def test_argv_drops_every_capability_but_the_uid_switch() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    added = {argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"}
    assert added == {"CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"}


def test_argv_switches_to_the_sandbox_uid_without_privileges() -> None:
    argv = argv_for(SandboxSpec(owner="w"))
    tail = argv[argv.index("--") + 1 :]
    assert tail[0] == "setpriv"
    assert f"--reuid={UID}" in tail and f"--regid={UID}" in tail
    assert "--no-new-privs" in tail and "--bounding-set=-all" in tail and "--clear-groups" in tail


def test_argv_unprivileged_caller_uses_a_user_namespace_and_no_setpriv() -> None:
    layout = HostLayout(
        python=LAYOUT.python,
        python_prefix=LAYOUT.python_prefix,
        packages=LAYOUT.packages,
        privileged=False,
    )
    argv = argv_for(SandboxSpec(owner="w"), layout)
    assert "--unshare-user" in sandbox_part(argv)
    assert "--cap-add" not in argv
    assert "setpriv" not in argv


def test_argv_binds_only_system_python_and_runtime_packages_read_only() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    ro = pairs(argv, "--ro-bind")
    assert ("/usr", "/usr") in ro
    assert ("/opt/py", "/opt/py") in ro
    assert ("/src/rayflow", f"{SANDBOX_LIB}/rayflow") in ro
    assert ("/venv/site-packages/msgpack", f"{SANDBOX_LIB}/msgpack") in ro
    assert pairs(argv, "--bind") == []
    sources = {s for s, _ in ro + pairs(argv, "--ro-bind-try")}
    assert "/" not in sources
    for secret in ("/root", "/home", "/etc/shadow", "/etc", "/work", "/src"):
        assert secret not in sources


def test_argv_recreates_merged_usr_links() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    assert ("usr/bin", "/bin") in pairs(argv, "--symlink")


def test_argv_makes_bind_parents_traversable_before_binding() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    opt_dir = next(i for i, a in enumerate(argv) if a == "--dir" and argv[i + 1] == "/opt")
    assert argv[opt_dir - 2 : opt_dir] == ["--perms", "0755"]
    assert opt_dir < argv.index("/opt/py")


def test_argv_writes_a_passwd_naming_the_sandbox_user_from_a_fd() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    assert ("7", "/etc/passwd") in pairs(argv, "--ro-bind-data")
    assert ("8", "/etc/group") in pairs(argv, "--ro-bind-data")
    passwd, group = passwd_lines(UID, "/workspace")
    assert f"sandbox:x:{UID}:{UID}::/workspace:/bin/sh" in passwd.decode()
    assert f"sandbox:x:{UID}:" in group.decode()


def test_argv_gives_tmp_and_workdir_private_size_limited_tmpfs() -> None:
    spec = SandboxSpec(owner="w", workdir="/work/space", limits=Limits(disk_bytes=64 * MIB))
    argv = sandbox_part(argv_for(spec))
    tmpfs = [i for i, a in enumerate(argv) if a == "--tmpfs"]
    targets = [argv[i + 1] for i in tmpfs]
    assert targets == ["/tmp", "/work/space"]
    for i in tmpfs:
        assert argv[i - 2 : i] == ["--size", str(64 * MIB)]
    assert argv[argv.index("--chdir") + 1] == "/work/space"


def test_argv_without_disk_limit_has_no_size() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w", limits=Limits(disk_bytes=None))))
    assert "--size" not in argv


def test_argv_clears_the_environment_then_sets_the_spec_env() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w", env={"FOO": "bar", "HOME": "/h"})))
    clear = argv.index("--clearenv")
    env = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"}
    assert all(i > clear for i, a in enumerate(argv) if a == "--setenv")
    assert env["FOO"] == "bar" and env["HOME"] == "/h"
    assert env["PATH"].startswith("/opt/py/bin:")


def test_argv_spec_mounts_come_after_the_tmpfs_with_their_mode() -> None:
    spec = SandboxSpec(
        owner="w",
        mounts=(Mount("/data/in", "/workspace/in"), Mount("/data/out", "/mnt/out", read_only=False)),
    )
    argv = sandbox_part(argv_for(spec))
    assert ("/data/in", "/workspace/in") in pairs(argv, "--ro-bind")
    assert ("/data/out", "/mnt/out") in pairs(argv, "--bind")
    assert argv.index("/data/in") > max(i for i, a in enumerate(argv) if a == "--tmpfs")


def test_argv_starts_the_runtime_site_free_with_the_packages_on_the_path() -> None:
    argv = argv_for(SandboxSpec(owner="w"))
    python = argv.index("/opt/py/bin/python3.11")
    assert argv[python + 1 : python + 4] == ["-I", "-S", "-c"]
    assert SANDBOX_LIB in argv[python + 4] and "rayflow.guest" in argv[python + 4]
    assert argv[python + 5] == "serve"


def test_argv_passes_info_and_block_fds() -> None:
    argv = sandbox_part(argv_for(SandboxSpec(owner="w")))
    assert argv[argv.index("--info-fd") + 1] == "5"
    assert argv[argv.index("--block-fd") + 1] == "6"


@pytest.mark.parametrize(
    "policy", [NetworkPolicy.hub_only("127.0.0.1", 7000), NetworkPolicy.allow_list(("a", 1))]
)
def test_argv_refuses_network_modes_other_than_none(policy: NetworkPolicy) -> None:
    with pytest.raises(ConfigError, match="only network mode 'none'"):
        argv_for(SandboxSpec(owner="w", network=policy))


def test_argv_replaces_the_runtime_with_a_probe_command() -> None:
    spec = SandboxSpec(owner="w")
    plan = plan_limits(spec.limits, None)
    argv = bwrap_argv(spec, LAYOUT, uid=UID, fds=FDS, plan=plan, command=["/bin/true"])
    assert argv[-1] == "/bin/true" and "serve" not in argv


def test_plan_uses_the_cgroup_for_what_it_accepted() -> None:
    plan = plan_limits(Limits(), ("memory", "swap", "pids", "cpu"))
    assert plan.applied() == {
        "memory": "cgroup+swap",
        "pids": "cgroup",
        "cpu": "cgroup",
        "disk": "tmpfs-size",
        "wall_time": "timer",
    }
    assert plan.rlimits == () and plan.exec_memory_bytes is None


def test_plan_falls_back_to_rlimits_without_a_cgroup() -> None:
    plan = plan_limits(Limits(memory_bytes=64 * MIB, pids=16), None)
    assert plan.memory == "rlimit-as" and plan.exec_memory_bytes == 64 * MIB
    assert plan.pids == "rlimit-nproc" and plan.rlimits == ("--nproc=16",)
    assert plan.cpu is None


def test_plan_fallback_appears_in_argv() -> None:
    spec = SandboxSpec(owner="w", limits=Limits(memory_bytes=64 * MIB, pids=16))
    argv = argv_for(spec, cgroup=None)
    assert argv[argv.index("prlimit") + 1 : argv.index("prlimit") + 3] == ["--nproc=16", "--"]
    assert argv[-1] == f"--exec-memory-bytes={64 * MIB}"


def test_plan_leaves_out_unset_limits() -> None:
    plan = plan_limits(Limits(cpus=None, memory_bytes=None, pids=None, disk_bytes=None, wall_time_s=None), ())
    assert plan.applied() == {}


def test_cgroup_v1_plan_sets_memsw_equal_after_memory() -> None:
    plan = plan_v1(Limits(cpus=0.5, memory_bytes=100 * MIB, pids=10))
    assert plan["memory"] == [
        ("memory.limit_in_bytes", str(100 * MIB)),
        ("memory.memsw.limit_in_bytes", str(100 * MIB)),
    ]
    assert plan["pids"] == [("pids.max", "10")]
    assert plan["cpu"] == [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000")]


def test_cgroup_v2_plan_forbids_swap() -> None:
    plan = dict(plan_v2(Limits(cpus=2.0, memory_bytes=100 * MIB, pids=10)))
    assert plan == {
        "memory.max": str(100 * MIB),
        "memory.swap.max": "0",
        "pids.max": "10",
        "cpu.max": "200000 100000",
    }


MOUNTINFO = """\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
34 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
35 34 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
36 34 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
37 34 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
38 34 0:34 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
"""
PROC_CGROUP = """\
4:memory:/jobs/abc
3:pids:/
2:cpu,cpuacct:/
0::/
"""


def test_mountinfo_lists_cgroup_mounts_only() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m[1] for m in mounts] == [
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
    ]


def test_proc_cgroup_maps_each_controller() -> None:
    assert parse_proc_cgroup(PROC_CGROUP) == {
        "memory": "/jobs/abc",
        "pids": "/",
        "cpu": "/",
        "cpuacct": "/",
        "": "/",
    }


def test_hybrid_machine_uses_v1_hierarchies_below_the_callers_group() -> None:
    hierarchies = find_hierarchies(MOUNTINFO, PROC_CGROUP)
    assert all(h.version == 1 for h in hierarchies)
    dirs = {h.controllers: h.own_dir for h in hierarchies}
    assert dirs[("memory",)] == "/sys/fs/cgroup/memory/jobs/abc"
    assert dirs[("cpu", "cpuacct")] == "/sys/fs/cgroup/cpu,cpuacct"
    assert dirs[("pids",)] == "/sys/fs/cgroup/pids"


def test_pure_v2_machine_uses_the_unified_tree() -> None:
    mountinfo = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    (h,) = find_hierarchies(mountinfo, "0::/user.slice/job\n")
    assert h.version == 2 and h.own_dir == "/sys/fs/cgroup/user.slice/job"


def test_container_mount_root_is_stripped_from_the_group_path() -> None:
    mountinfo = "36 34 0:32 /docker/c1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    (h,) = find_hierarchies(mountinfo, "4:memory:/docker/c1/inner\n")
    assert h.own_dir == "/sys/fs/cgroup/memory/inner"


def test_counter_reads_a_key_of_a_flat_file() -> None:
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert counter(text, "oom_kill") == 3
    assert counter(text, "missing") == 0


def test_record_round_trips_through_json() -> None:
    record = Record("rf-1", "worker-1", 10, 99, 11, 100, UID, ("/sys/fs/cgroup/pids/rayflow-rf-1",))
    assert Record.from_json(record.to_json()) == record
