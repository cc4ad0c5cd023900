"""Running a command as deploy/systemd/imaptap.service would, without systemd as PID 1.

systemd is not PID 1 on the machines the tests run on, so the unit itself cannot be started;
this builds what its [Service] section asks for from the same kernel features systemd uses,
read from the unit file itself: a mount namespace (ProtectSystem=strict, ProtectHome,
PrivateTmp, PrivateDevices, ProtectKernelTunables, ProtectProc, ProtectKernelLogs, a writable
LogsDirectory and StateDirectory with $STATE_DIRECTORY), the capability sets and no_new_privs
(setpriv), RLIMIT_MEMLOCK and the umask, and a seccomp filter (SystemCallFilter expanded by
``systemd-analyze syscall-filter``, SystemCallErrorNumber, SystemCallArchitectures,
RestrictAddressFamilies, RestrictNamespaces).
`NOT_EMULATED` names every directive it leaves out and why; a directive in neither list fails
the test, so a new line in the unit is either emulated or explained.

Used as a script in two stages: ``setup`` (root, in the new mount namespace: mounts, then
setpriv), ``seccomp`` (as the service's user: the filter, then the command).  The test lays out
``opt`` (mounted at /opt): ``venv`` (a mount point for the virtual environment), this file, and
the service's executable.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

#: The [Service] directives emulated here.
EMULATED = {
    "DynamicUser", "User", "LogsDirectory", "LogsDirectoryMode", "StateDirectory", "StateDirectoryMode", "UMask",
    "AmbientCapabilities",
    "CapabilityBoundingSet", "NoNewPrivileges", "LimitMEMLOCK", "ProtectSystem", "ProtectHome", "PrivateTmp",
    "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectProc", "PrivateMounts", "RestrictAddressFamilies", "RestrictNamespaces", "SystemCallArchitectures",
    "SystemCallFilter", "SystemCallErrorNumber",
}
#: Directives that say how the service is run rather than what it may do: the test runs the
#: command itself (ExecStart with the environment expanded) and signals it as systemd would.
RUN_BY_THE_TEST = {
    "Type", "NotifyAccess", "Environment", "EnvironmentFile", "ExecStart", "ExecReload", "Restart", "RestartSec",
    "TimeoutStartSec", "TimeoutStopSec",
}
#: Directives not emulated, and why leaving them out cannot hide a failure of the service.
NOT_EMULATED = {
    "ProtectClock": "drops CAP_SYS_TIME and CAP_WAKE_ALARM, which the bounding set has not anyway, and denies"
                    " the real-time clock device, which PrivateDevices hides too",
    "ProtectHostname": "a UTS namespace: imaptap never sets the host name",
    "RestrictRealtime": "denies real-time scheduling, which imaptap never asks for",
    "RestrictSUIDSGID": "denies making set-user-ID files, which imaptap never makes",
    "LockPersonality": "denies personality() changes, which imaptap never makes",
    "IPAddressDeny": "a cgroup socket filter on IP traffic; imaptap sends none (netlink and BPF maps only),"
                     " and XDP and TC programs are not subject to it",
}
#: Where the service's files are, inside the sandbox.
OPT = "/opt"
LOGS = "/var/log"
STATE = "/var/lib"
#: Device nodes PrivateDevices leaves, as systemd does.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: errno for a socket family RestrictAddressFamilies leaves out, as systemd answers.
FAMILY_ERRNO = errno.EAFNOSUPPORT
#: clone() flags that make namespaces (RestrictNamespaces=yes denies them all).
CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080
#: The highest address family number Linux knows (AF_MCTP, 6.x).
AF_MAX = 45
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}


def parse_unit(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The [Service] section: each directive's values in order (comments and blank lines dropped)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand_syscalls(names: list[str], seen: set[str] | None = None) -> set[str]:
    """System call names and @groups, groups expanded as systemd expands them."""
    seen = set() if seen is None else seen
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                             check=True).stdout
        members = [line.strip() for line in out.splitlines()[1:]
                   if line.startswith("    ") and not line.strip().startswith("#")]
        calls |= expand_syscalls(members, seen)
    return calls


def spec_of(unit: dict[str, list[str]], logs: str, opt: str, venv: str, state: str = "") -> dict:
    """What the sandbox stages need, from the unit: a JSON-able dict."""
    def one(key: str, default: str = "") -> str:
        return unit.get(key, [default])[-1]

    def words(key: str) -> list[str]:
        return [w for v in unit.get(key, []) for w in v.split()]

    filters = words("SystemCallFilter")
    return {
        "logs": logs, "opt": opt, "venv": venv, "logs_dir": one("LogsDirectory"),
        "logs_mode": one("LogsDirectoryMode", "0755"), "umask": one("UMask", "0022"),
        "state": state, "state_dir": one("StateDirectory"), "state_mode": one("StateDirectoryMode", "0755"),
        "ambient": words("AmbientCapabilities"),
        "bounding": words("CapabilityBoundingSet"), "no_new_privs": one("NoNewPrivileges") == "yes",
        "memlock_infinity": one("LimitMEMLOCK") == "infinity", "protect_system": one("ProtectSystem"),
        "protect_home": one("ProtectHome"), "private_tmp": one("PrivateTmp") == "yes",
        "private_devices": one("PrivateDevices") == "yes", "protect_tunables": one("ProtectKernelTunables") == "yes",
        "protect_modules": one("ProtectKernelModules") == "yes", "protect_logs": one("ProtectKernelLogs") == "yes",
        "protect_proc": one("ProtectProc", "default"), "syscalls": sorted(expand_syscalls(filters)),
        "syscall_errno": one("SystemCallErrorNumber"), "native_only": one("SystemCallArchitectures") == "native",
        "families": words("RestrictAddressFamilies"), "restrict_namespaces": one("RestrictNamespaces") == "yes",
    }


def command(spec_path: str, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` in the sandbox ``spec_path`` describes (as root)."""
    return ["unshare", "--mount", "--propagation", "private", sys.executable, __file__, "setup", spec_path, "--",
            *argv]


# --- stage 1, root in a new mount namespace ------------------------------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        points.append(point)
    return points


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _inaccessible(path: str) -> None:
    if os.path.isdir(path):
        _mount("-t", "tmpfs", "-o", "ro,mode=000,size=4k", "tmpfs", path)


def setup(spec: dict, argv: list[str]) -> None:
    """Build the mount namespace, then run stage 2 through setpriv as the service's user."""
    if spec["memlock_infinity"]:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except ValueError:
            # This root may lack CAP_SYS_RESOURCE (a container); systemd has it.  From 5.11 on,
            # BPF memory is charged to the cgroup, not to this limit, so it changes nothing.
            if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (5, 11):
                raise
    # LogsDirectory: the one writable place, under a /var/log of its own
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", LOGS)
    logs = os.path.join(LOGS, spec["logs_dir"])
    os.mkdir(logs)
    _mount("--bind", spec["logs"], logs)
    os.chmod(logs, int(spec["logs_mode"], 8))
    # StateDirectory: a /var/lib of its own, the service's directory bound there, and named in
    # $STATE_DIRECTORY, which setpriv passes on
    state = ""
    if spec["state_dir"]:
        assert spec["state"], "the test gives the state directory's contents"
        _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", STATE)
        state = os.path.join(STATE, spec["state_dir"])
        os.mkdir(state)
        _mount("--bind", spec["state"], state)
        os.chmod(state, int(spec["state_mode"], 8))
        os.environ["STATE_DIRECTORY"] = state
    _mount("--bind", spec["opt"], OPT)
    _mount("--bind", spec["venv"], os.path.join(OPT, "venv"))
    # PrivateTmp, and a copy of /dev's nodes for PrivateDevices while the real one is still there
    if spec["private_tmp"]:
        for tmp in ("/tmp", "/var/tmp"):
            _mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", tmp)
    if spec["private_devices"]:
        host_dev = "/tmp/.host-dev" if spec["private_tmp"] else None
        assert host_dev, "PrivateDevices is emulated with PrivateTmp's /tmp"
        os.mkdir(host_dev)
        _mount("--rbind", "/dev", host_dev)
        _mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", "/dev")
        for name in DEVICES:
            Path("/dev", name).touch()
            _mount("--bind", os.path.join(host_dev, name), os.path.join("/dev", name))
        for name in ("pts", "shm"):
            os.mkdir(os.path.join("/dev", name))
        _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/dev/shm")
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, os.path.join("/dev", name))
        _mount("--make-rprivate", host_dev)
        subprocess.run(["umount", "-l", host_dev], check=True)
        os.rmdir(host_dev)
    if spec["protect_proc"] not in ("default", ""):
        _mount("-t", "proc", "-o", f"hidepid={spec['protect_proc']}", "proc", "/proc")
    # ProtectSystem=strict: everything read-only but the API file systems and the logs
    if spec["protect_system"] == "strict":
        api = ("/proc", "/sys", "/dev")
        for point in _mount_points():
            if _under(point, api) or point in (logs, state, "/tmp", "/var/tmp"):
                continue
            try:
                _mount("-o", "remount,bind,ro", point)
            except subprocess.CalledProcessError:
                if not point.startswith("/run/netns/"):  # namespace handles are not file systems
                    raise
    if spec["protect_home"] == "yes":
        for home in ("/home", "/root", "/run/user"):
            _inaccessible(home)
    if spec["protect_tunables"]:
        _mount("--bind", "/proc/sys", "/proc/sys")
        _mount("-o", "remount,bind,ro", "/proc/sys")
        for point in _mount_points():
            if _under(point, ("/sys",)):
                subprocess.run(["mount", "-o", "remount,bind,ro", point], capture_output=True)
    if spec["protect_modules"]:
        _inaccessible("/lib/modules")
    if spec["protect_logs"]:
        empty = "/dev/shm/.inaccessible"
        Path(empty).touch(mode=0)
        _mount("--bind", empty, "/proc/kmsg")
    caps = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in spec["ambient"])
    bounding = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in spec["bounding"])
    setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", f"--bounding-set=-all,{bounding}",
               f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}"]
    if spec["no_new_privs"]:
        setpriv.append("--no-new-privs")
    os.umask(int(spec["umask"], 8))
    spec_path = os.path.join("/dev/shm", "sandbox.json")
    Path(spec_path).write_text(json.dumps(spec))
    os.chmod(spec_path, 0o644)  # the umask is the service's already
    # The venv is reached through /opt: ProtectHome hides a checkout under /root.
    python = os.path.join(OPT, "venv", "bin", "python")
    os.execvp("setpriv", [*setpriv, "--", python, os.path.join(OPT, "sandbox.py"), "seccomp", spec_path, "--", *argv])


# --- stage 2, as the service's user ----------------------------------------------------------------


def install_filter(spec: dict) -> None:
    """The seccomp filter systemd would load for the unit."""
    import seccomp

    name = spec["syscall_errno"]
    default = seccomp.ERRNO(int(name) if name.isdigit() else getattr(errno, name)) if name else seccomp.KILL_PROCESS
    f = seccomp.SyscallFilter(defaction=default)
    if not spec["native_only"]:
        raise SystemExit("only SystemCallArchitectures=native is emulated")
    family_numbers = [FAMILIES[name] for name in spec["families"]]
    special = {"socket", "clone", "clone3", "unshare", "setns"}
    for name in spec["syscalls"]:
        if name in special:
            continue
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # a name libseccomp does not know on this architecture, as systemd skips it
    if "socket" in spec["syscalls"]:
        if family_numbers:
            for number in family_numbers:
                f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, number))
            # libseccomp takes one comparison per argument in a rule: each other family by itself
            for number in range(AF_MAX + 1):
                if number not in family_numbers:
                    f.add_rule(seccomp.ERRNO(FAMILY_ERRNO), "socket", seccomp.Arg(0, seccomp.EQ, number))
            f.add_rule(seccomp.ERRNO(FAMILY_ERRNO), "socket", seccomp.Arg(0, seccomp.GT, AF_MAX))
        else:
            f.add_rule(seccomp.ALLOW, "socket")
    if "clone" in spec["syscalls"]:
        if spec["restrict_namespaces"]:
            f.add_rule(seccomp.ALLOW, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEW, 0))
        else:
            f.add_rule(seccomp.ALLOW, "clone")
    if "clone3" in spec["syscalls"]:
        # Its flags are behind a pointer no filter can read: systemd answers ENOSYS, and glibc
        # falls back to clone().
        f.add_rule(seccomp.ERRNO(errno.ENOSYS) if spec["restrict_namespaces"] else seccomp.ALLOW, "clone3")
    for name in ("unshare", "setns"):
        if name in spec["syscalls"] and not spec["restrict_namespaces"]:
            f.add_rule(seccomp.ALLOW, name)
    f.load()


def run_filtered(spec: dict, argv: list[str]) -> None:
    install_filter(spec)
    os.execv(argv[0], argv)


def main() -> None:
    stage, spec_path, sep, *argv = sys.argv[1:]
    assert sep == "--"
    spec = json.loads(Path(spec_path).read_text())
    if stage == "setup":
        setup(spec, argv)
    else:
        run_filtered(spec, argv)


if __name__ == "__main__":
    main()
