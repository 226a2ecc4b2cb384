"""A writer lease per run directory: at most one training process writes into a run at a time.

Clusters sometimes put two trainers on one run directory (a job resubmitted by hand while its
requeued twin runs, a sweep relaunched over live runs). Before writing anything, rank 0 takes
RUN/lease.json. The protocol works on NFS, Lustre and GPFS, where flock is unreliable:

  take      write our record to a private temp file, fsync it, then os.link() it to lease.json.
            link() is atomic on all of them: exactly one taker creates the name. NFS may report
            an error for a link that did happen, so the temp's link count decides.
  heartbeat a daemon thread checks every `heartbeat_s` that lease.json still carries our token
            and bumps its mtime. It never rewrites the content, so it cannot clobber a taker's
            record; if the token changed or the file is gone, it sets `lease.lost` and the
            trainer stops.
  stale     a held lease is broken when its holder cannot be writing anymore: a SLURM requeue of
            our own job, a dead (or reused) pid on this host, a job SLURM no longer runs, or a
            heartbeat older than `timeout_s`. `--takeover` breaks a live one; the taker then waits
            two of the holder's heartbeats so the old writer has stopped.
  break     the lease carrying token T is removed only by the process that created the guard
            .lease.break.T (link, as above), after re-reading lease.json under it. Several takers
            of one stale lease thus remove it once, and a taker that judged it a moment too late
            finds the newer lease instead of removing it. The removal itself renames lease.json
            aside and checks the moved token (a wrong one goes back) as a second line of defence.
            The holder's own release goes through the same guard.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

LEASE_FILE = "lease.json"
ATTEMPTS = 20  # link / judge / break rounds before giving up (each round someone else made progress)
GUARD_STALE_S = 60.0  # a break guard this old was left by a taker that died mid-break
# squeue states in which the job's processes may still run: a holder in any of these is not stale
# by rule 3 (a suspended or stopped job resumes and would go on writing)
LIVE_SLURM_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"}


class LeaseError(RuntimeError):
    """The run directory is held by a live writer."""


class LeaseLost(RuntimeError):
    """Raised by the trainer when the heartbeat found the lease taken from it."""


# ---------------------------------------------------------------------------------------------
# reading a lease


def _parse_record(raw: bytes, mtime: float) -> dict:
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        # not ours to interpret: only its age (rule 4) or --takeover can clear it
        info = {"error": f"unreadable lease record ({len(raw)} bytes)"}
    info["heartbeat_age_s"] = time.time() - mtime
    return info


def _read_open(f) -> dict:
    # fstat on the open file: content and mtime of the same inode, and on NFS open() revalidates
    # the cached attributes (close-to-open), so the mtime is the server's current one
    st = os.fstat(f.fileno())
    return _parse_record(f.read(), st.st_mtime)


def read_lease(run_dir) -> dict | None:
    """The lease record plus "heartbeat_age_s" (now - the file's mtime); None when no lease."""
    try:
        with open(Path(run_dir) / LEASE_FILE, "rb") as f:
            return _read_open(f)
    except FileNotFoundError:
        return None


def _slurm_id(info: dict) -> str | None:
    """The id squeue knows the holder by: "<array job>_<task>" for an array task."""
    if info.get("slurm_array_job_id") is not None and info.get("slurm_array_task_id") is not None:
        return f"{info['slurm_array_job_id']}_{info['slurm_array_task_id']}"
    return info.get("slurm_job_id")


def describe_holder(info: dict) -> str:
    """One line naming a lease holder, e.g.
    host n12 pid 4242 (SLURM job 1234_7, restart 1), started 2026-11-29 14:03:11, heartbeat 12 s ago"""
    if "error" in info:
        text = info["error"]
    else:
        text = f"host {info.get('host', '?')} pid {info.get('pid', '?')}"
        job = _slurm_id(info)
        if job is not None:
            text += f" (SLURM job {job}, restart {info.get('slurm_restart_count', 0)})"
        if isinstance(info.get("started"), (int, float)):
            text += ", started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
    if info.get("heartbeat_age_s") is not None:
        text += f", heartbeat {info['heartbeat_age_s']:.0f} s ago"
    return text


# ---------------------------------------------------------------------------------------------
# is the holder still writing?


def _parse_proc_stat(text: str) -> tuple[str, int]:
    """(state, starttime in clock ticks) from /proc/<pid>/stat. The comm field (2) may hold spaces
    and parentheses, so fields are counted from the last ')': state is field 3, starttime 22."""
    fields = text[text.rindex(")") + 1:].split()
    return fields[0], int(fields[19])


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, starttime) of a pid; None when the pid is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return _parse_proc_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def pid_namespace() -> str | None:
    """This boot's id and this process's pid namespace: pids compare only where both match."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def pid_start(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): with the pid it names the process, even
    after the pid is reused. None where /proc is absent."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _pid_gone(pid: int, start: int | None) -> str | None:
    """Why a pid on this host no longer is the holder, or None if it may be."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running on this host"
    except PermissionError:
        pass  # it runs, as another user
    stat = _proc_stat(pid)
    if stat is None:
        return None  # no /proc, or it hides other users' processes (hidepid): it runs, that is all we know
    state, now_start = stat
    if state == "Z":
        return f"pid {pid} has exited (a zombie)"
    if start is not None and now_start != start:
        return f"pid {pid} is now another process (start time {now_start} != {start})"
    return None


def squeue_state(job_id: str) -> tuple[int, str, str] | None:
    """`squeue -h -j JOB -o %T` as (returncode, stdout, stderr); None when squeue is not on PATH or
    does not answer in 10 s. Tests replace this."""
    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        p = subprocess.run([exe, "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.returncode, p.stdout, p.stderr


def _slurm_verdict(job_id: str) -> tuple[str, str] | None:
    """("gone", why) when SLURM says the job is over, ("live", state) when it may still run, None
    when squeue gives no verdict."""
    answer = squeue_state(job_id)
    if answer is None:
        return None
    rc, out, err = answer
    if rc == 0:
        states = out.split()
        if not states:
            return "gone", f"SLURM job {job_id} is no longer in the queue"
        live = LIVE_SLURM_STATES.intersection(states)
        return ("live", sorted(live)[0]) if live else ("gone", f"SLURM job {job_id} is {states[0]}")
    if "invalid job id" in err.lower():
        return "gone", f"SLURM job {job_id} is unknown to SLURM"
    return None  # squeue failed some other way: no verdict


def stale_reason(info: dict, me: dict, heartbeat_age_s: float, timeout_s: float) -> str | None:
    """Why the lease `info` can be broken by `me` (both lease records), or None while its holder may
    still be writing. Rules in order: our own requeue, a dead pid on this host, a job SLURM no
    longer runs, a heartbeat older than the timeout."""
    job = info.get("slurm_job_id")
    theirs, mine = info.get("slurm_cluster"), me.get("slurm_cluster")
    # 1. SLURM requeued our job: the holder is our previous incarnation, which SLURM has killed.
    #    (Same job and the same restart count is two steps in one allocation: both may be alive.)
    if (job is not None and job == me.get("slurm_job_id") and theirs == mine
            and info.get("slurm_array_task_id") == me.get("slurm_array_task_id")
            and int(me.get("slurm_restart_count") or 0) > int(info.get("slurm_restart_count") or 0)):
        return (f"a requeue of the same job (SLURM job {_slurm_id(info)}, restart "
                f"{info.get('slurm_restart_count') or 0} -> {me.get('slurm_restart_count')})")
    # 2. a holder on this host whose pid is gone or now names another process. "This host" is
    #    the hostname and the pid namespace of this boot: containers sharing a hostname do not see
    #    each other's pids.
    pid = info.get("pid")
    if (info.get("host") == me.get("host") and info.get("pid_namespace") == me.get("pid_namespace")
            and isinstance(pid, int) and pid > 0):
        why = _pid_gone(pid, info.get("pid_start"))
        if why:
            return why
    # 3. SLURM's word on the holder's job, asked only of the holder's own cluster (job ids of
    #    another cluster mean nothing to our squeue: "Invalid job id" for a live job). A job it
    #    says may still run is not stale, however old its heartbeat (a suspended job resumes).
    if job is not None and theirs == mine:
        verdict = _slurm_verdict(_slurm_id(info))
        if verdict is not None:
            return verdict[1] if verdict[0] == "gone" else None
    # 4. nobody touched it for too long (by the holder's heartbeat too, should it beat slower)
    beat = info.get("heartbeat_s")
    timeout = max(timeout_s, 3 * beat) if isinstance(beat, (int, float)) else timeout_s
    if heartbeat_age_s > timeout:
        return f"heartbeat {heartbeat_age_s:.0f} s old, timeout {timeout:g} s"
    return None


# ---------------------------------------------------------------------------------------------
# the lease


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def holder_record(heartbeat_s: float, token: str) -> dict:
    """Who this process is, as stale_reason judges it: host, pid (with its start time and pid
    namespace), SLURM job, heartbeat period. A lease holds one; so does a reader's pin (pins.py)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": pid_start(os.getpid()),
        "pid_namespace": pid_namespace(),
        "slurm_job_id": _env("SLURM_JOB_ID"),
        "slurm_array_job_id": _env("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": _env("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": int(_env("SLURM_RESTART_COUNT") or 0),
        "slurm_cluster": _env("SLURM_CLUSTER_NAME"),
        "started": time.time(),
        "heartbeat_s": heartbeat_s,
        "token": token,
        "argv": list(sys.argv),
    }


class Lease:
    """An exclusive lease on `run_dir`. acquire(), then poll `lost` (or call check()) between steps;
    release() at the end. Usable as a context manager (which does not take over)."""

    def __init__(self, run_dir, timeout_s: float = 600.0, heartbeat_s: float = 30.0, log=print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEASE_FILE
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.log = log
        self.token: str | None = None
        self.record: dict = {}
        self._lost: str | None = None
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_record(self) -> dict:
        # a fresh token per acquire: a token, once its lease is removed, never names a lease again
        self.token = uuid.uuid4().hex
        # heartbeat_s: a taker waits two of these after --takeover
        return holder_record(self.heartbeat_s, self.token)

    # -- taking ---------------------------------------------------------------------------------

    def _link(self, name: Path) -> bool:
        """Atomically create `name` holding our record: False if it exists."""
        tmp = self.run_dir / f".lease.{self.token}.tmp"
        with open(tmp, "x") as f:
            json.dump(self.record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # the record is complete before the name appears
        try:
            os.link(tmp, name)
            linked = True
        except FileExistsError:
            linked = False
        except OSError:
            # NFS retransmits can turn a link that happened into an error: count the temp's links
            linked = os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)
        return linked

    def _remove(self, token) -> bool | None:
        """Remove lease.json if it still carries `token`: True when removed, False when it no longer
        does, None when another process is removing it right now.

        Only the process holding the guard .lease.break.<token> removes the lease carrying `token`,
        and it re-reads the lease under the guard. Without the guard, a taker that judged the old
        lease a moment too late would remove the fresh lease another taker just made."""
        guard = self.run_dir / f".lease.break.{token or 'unreadable'}"
        if not self._link(guard):
            try:
                if time.time() - os.stat(guard).st_mtime > GUARD_STALE_S:
                    os.unlink(guard)  # its maker died in the middle of a break
            except FileNotFoundError:
                pass
            return None
        try:
            info = read_lease(self.run_dir)
            if info is None or info.get("token") != token:
                return False
            # rename, then check what we moved: should the guard ever fail (a stalled breaker whose
            # guard was cleared as stale), a lease that is not the one we judged goes back
            aside = self.run_dir / f".lease.broken.{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                if not aside.exists():  # (NFS: a retransmitted rename can fail after it happened)
                    return False
            with open(aside, "rb") as f:
                moved = _read_open(f).get("token")
            if moved != token:
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass  # a third process holds it now; the one we moved learns at its next beat
            os.unlink(aside)
            return moved == token
        finally:
            try:
                os.unlink(guard)
            except FileNotFoundError:
                pass  # cleared as stale by another taker while we stalled

    def acquire(self, takeover: bool = False) -> None:
        """Take the lease or raise LeaseError naming the live holder; takeover=True breaks a live one."""
        if self._held:
            raise RuntimeError(f"the lease of {self.run_dir} is already held by this Lease")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.record = self._new_record()
        self._lost = None
        self._stop.clear()
        wait_s = 0.0  # after breaking a live lease: time for its holder to notice
        for _ in range(ATTEMPTS):
            if self._link(self.path):
                self._held = True
                self._thread = threading.Thread(target=self._heartbeat, name="enat-lease-heartbeat", daemon=True)
                self._thread.start()
                if wait_s > 0:
                    self.log(f"lease: waiting {wait_s:g} s for the old holder to notice it lost the lease")
                    time.sleep(wait_s)
                return
            info = read_lease(self.run_dir)
            if info is None:
                continue  # released or broken between our link and our read: try again
            reason = stale_reason(info, self.record, info["heartbeat_age_s"], self.timeout_s)
            forced = reason is None
            if forced:
                if not takeover:
                    raise LeaseError(
                        f"run directory {self.run_dir} is in use by another training run: "
                        f"{describe_holder(info)}. To take it over, pass --takeover to `enat train` / "
                        f"launch/train.py (the holder stops at its next heartbeat), or wait until its "
                        f"heartbeat is older than {self.timeout_s:g} s")
                reason = "forced by --takeover"
            removed = self._remove(info.get("token"))
            if removed is None:
                time.sleep(0.1)  # another taker is breaking it: see what it leaves
            elif removed:
                self.log(f"lease: taking over the lease of {describe_holder(info)}: {reason}")
                if forced:
                    beat = info.get("heartbeat_s")
                    beat = float(beat) if isinstance(beat, (int, float)) else self.heartbeat_s
                    wait_s = max(wait_s, 2 * beat)
        raise LeaseError(f"could not take the lease of {self.run_dir} in {ATTEMPTS} attempts: other "
                         f"processes keep taking or breaking {self.path}; try again")

    # -- holding --------------------------------------------------------------------------------

    def _verify(self, touch: bool) -> str | None:
        """None while lease.json carries our token (bumping its mtime if `touch`), else why not.
        OSErrors other than a missing file propagate: the caller treats them as transient."""
        try:
            with open(self.path, "rb") as f:
                info = _read_open(f)
                if info.get("token") == self.token:
                    if touch:
                        # through the fd: touches the very file we just read, never a taker's
                        os.utime(f.fileno() if os.utime in os.supports_fd else self.path)
                    return None
        except FileNotFoundError:
            return "lease file removed"
        return f"taken over by {describe_holder(info)}"

    def _set_lost(self, reason: str) -> str:
        if self._lost is None:
            self._lost = reason
            self.log(f"lease: lost the lease of {self.run_dir}: {reason}")
        return self._lost

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                reason = self._verify(touch=True)
            except OSError:
                continue  # a network filesystem hiccup: try again at the next beat
            if reason is not None:
                self._set_lost(reason)
                return  # not ours anymore: stop touching it

    @property
    def lost(self) -> str | None:
        """Set (by the heartbeat thread) when the lease is no longer ours: why, naming the new holder."""
        return self._lost

    def check(self) -> str | None:
        """Re-read the lease now: None if it is still ours, else (and from then on) the reason."""
        if self._lost is not None:
            return self._lost
        try:
            reason = self._verify(touch=False)
        except OSError:
            return None  # cannot tell right now; the heartbeat keeps trying
        return None if reason is None else self._set_lost(reason)

    def release(self) -> None:
        """Stop the heartbeat and delete lease.json if it is still ours. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self._held:
            return
        self._held = False
        # through the guard, like a taker: never races one that is breaking our lease right now
        # (if one is, it removes the file)
        self._remove(self.token)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
