"""Keep processes of the same user, a spawned child above all, out of the sidecar's memory.

Why: the child runs under the sidecar's uid, and by default a process may read another of its
own uid through /proc/<pid>/environ and /proc/<pid>/mem, or attach to it with ptrace: a child
would read every secret the sidecar holds, whatever was scrubbed from its own environment.
prctl(PR_SET_DUMPABLE, 0), as OpenSSH's sshd does, makes the kernel treat the sidecar like a
setuid program: its /proc files belong to root, and ptrace by an unprivileged process is
refused (ptrace(2), "Ptrace access mode checking"; proc(5)). The costs: no core dump is written,
and a debugger or profiler (gdb, py-spy) cannot attach as the same user. Root, or any process
with CAP_SYS_PTRACE, still can: it is no defence against them, and a child in a container of
its own (another uid, no shared files or process namespace) remains the stronger isolation.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4  # <linux/prctl.h>


def forbid_inspection() -> str | None:
    """Make this process non-dumpable: None when done, else why not (to be logged once)."""
    if not sys.platform.startswith("linux"):
        return f"only Linux is supported, this is {sys.platform}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            return f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}"
        dumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError) as exc:  # no C library to load, or one without prctl
        return f"prctl is unavailable: {exc}"
    return None if dumpable == 0 else f"the process is still dumpable ({dumpable})"
