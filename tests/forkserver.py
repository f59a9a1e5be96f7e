"""Runs commands for tests/test_errors.py, each in a fresh fork of one interpreter that has imported torch.

A new interpreter per command costs 3-4 s of CPU for `import torch` alone; a fork of this one costs
milliseconds, and is still a process of its own, with its own exit status and stderr. It ends the way the
interpreter ends a script: an uncaught exception is printed and kept in sys.last_value (whose traceback keeps
every frame alive), then the exit handlers run (multiprocessing's joins the children it started). Only the
interpreter's final teardown of every module, a few seconds of copy-on-write page faults in a fork of a
process that imported torch, is skipped.

Reads one JSON request per line on stdin:
    {"argv": ["alip.py", ...] or ["-m", "torch.distributed.run", ...], "out": PATH, "err": PATH,
     "timeout": SECONDS, "env": {...}, "fsize": BYTES or absent (the largest file the command may write)}
and answers one JSON line on stdout:
    {"status": exit status (-N: killed by signal N), "seconds": until every process the command started
     had ended, "timed_out": bool}
This process is a child subreaper (Linux), so processes a command leaves behind (DataLoader workers,
torchrun's ranks) become its children: a command has ended only when all of them have. At the timeout
they are all killed.
"""
import atexit
import ctypes
import gc
import json
import os
import resource
import runpy
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def _descendants():
    """Pids of every process below this one, read from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # pid (comm) state ppid ...: comm may hold spaces, so split after its closing bracket
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = set(), [os.getpid()]
    while todo:
        p = todo.pop()
        children = [c for c, pp in parent.items() if pp == p and c not in found]
        found.update(children)
        todo += children
    return found


def _wait_all(pid, deadline):
    """(exit status of pid, timed_out) once pid and every process it left behind have ended."""
    status, timed_out = None, False
    while True:
        try:
            done, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status, timed_out
        if done == pid:
            status = os.waitstatus_to_exitcode(code)
        elif done == 0:
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                for p in _descendants():
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = float("inf")
            time.sleep(0.02)


def _child(request):
    os.setpgid(0, 0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(request.get("env", {}))
    if request.get("fsize"):  # no file may grow past this: a write beyond it fails (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    argv = list(request["argv"])
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # what the interpreter does with an uncaught exception
        sys.last_type, sys.last_value, sys.last_traceback = type(e), e, e.__traceback__
        sys.excepthook(type(e), e, e.__traceback__)
        status = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    os.chdir(root)
    import torch
    import alip, data, eval  # noqa: F401  (imported once, here, for every command)
    torch.set_num_threads(1)
    # torch imports much of itself on first use (an optimizer pulls in torch.distributed.tensor): here, once
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).step()
    gc.freeze()  # what is imported now stays out of every fork's garbage collections (and off its page copies)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    for line in sys.stdin:
        request = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(request)
        status, timed_out = _wait_all(pid, t0 + request["timeout"])
        print(json.dumps({"status": status, "seconds": time.monotonic() - t0, "timed_out": timed_out}), flush=True)
    os._exit(0)  # the interpreter's teardown would take seconds and tests nothing


if __name__ == "__main__":
    main()
