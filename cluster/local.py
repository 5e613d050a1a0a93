"""A real multi-process Ray cluster on this machine, for trying `ray job submit` end to end.

    python -m cluster.local up [--workers N] [--num-cpus C] [--worker-cpus C] [--num-gpus G]
    python -m cluster.local status | env | url
    python -m cluster.local down

`up` runs `ray start --head` (and `ray start --address ...` once per extra worker node) and
writes `<state-dir>/cluster.json` (default `.ray-local/`) with the GCS address, the dashboard /
Jobs API URL and what `down` needs. Then submit jobs as on any cluster:

    eval "$(python -m cluster.local env)"     # RAY_ADDRESS=http://127.0.0.1:<port>, RAY_AUTH_MODE
    ray job submit --working-dir . ... -- python -m jobs.train ...

Decisions, so that this cluster never disturbs other Ray instances on the same machine (test
sessions, other users):

- Its own `--temp-dir` (short, under /tmp: Unix socket paths are limited to ~107 bytes). `ray
  start` writes `ray_current_cluster` there instead of `/tmp/ray/`, so a plain `ray.init()`
  elsewhere on the machine does not silently connect to this cluster.
- Free ports everywhere. GCS, node manager, object manager, agents and workers bind port 0 (the
  OS picks; `--min/max-worker-port=0` instead of `ray start`'s shared 10002-19999 range). The
  ports Ray cannot pick itself are chosen free here: dashboard (Jobs API), dashboard agent HTTP
  (defaults to a fixed 52365 that would clash between nodes) and the Ray Client server.
- The dashboard / Jobs API listens on 127.0.0.1 only. Ray resolves `--node-ip-address=127.0.0.1`
  to the machine's address on Linux and its GCS/raylet gRPC servers listen on all interfaces, so
  the cluster runs with Ray's token authentication (`RAY_AUTH_MODE=token`, Ray's default for new
  local clusters since 2.5x): the token is Ray's usual one (`$RAY_AUTH_TOKEN`,
  `$RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, created if missing). Clients need
  `RAY_AUTH_MODE=token` too: `eval "$(python -m cluster.local env)"` exports it with RAY_ADDRESS.
  An existing token file is used only if it is a regular file (not a symlink) owned by this user
  that nobody else can write (one others can write may be theirs): otherwise a one-line error
  naming the file and the fix. A token file others can *read* is made private (0600) with a
  warning: Ray 2.60 itself writes ~/.ray/auth_token with the process umask, usually 0644.
- `--no-auth` turns token auth off. Ray 2.60 has no option to bind the GCS and raylet gRPC servers
  to loopback only, so after `up` the cluster's listening sockets are read from /proc and every
  one on a non-loopback address is named in a warning: without auth, anyone who can reach those
  ports can run code as this user. The dashboard / Jobs API stays on 127.0.0.1 either way.
- `down` never runs `ray stop` (it kills every Ray process of the user on the machine). Every
  process this cluster starts inherits the environment variable `EMOTION_RAY_CLUSTER=<id>`
  (GCS, raylets, dashboard, workers, job drivers, which Ray starts in their own process
  groups) and their descendants; `down` finds exactly those in /proc, sends SIGTERM, then SIGKILL
  after a short grace period (raylet and GCS often ignore SIGTERM for 10+ s; nothing of a local
  dev cluster needs a graceful drain).
- The virtualenv that runs this script is put first on the cluster's PATH, so an entrypoint
  `python -m jobs.train` runs with the project's interpreter and pins, like a cluster image.

The Jobs API needs the dashboard, which needs `ray[default]` (aiohttp, grpcio, ...); `up` says so
if it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

MARKER_ENV = "EMOTION_RAY_CLUSTER"
STATE_FILE = "cluster.json"
DEFAULT_STATE_DIR = ".ray-local"


class ClusterError(RuntimeError):
    """The local cluster could not be started, found or stopped."""


@dataclass
class LocalCluster:
    cluster_id: str
    state_dir: str
    temp_dir: str
    gcs_address: str  # host:port, for `ray start --address` / ray.init(address=...)
    dashboard_url: str  # http://127.0.0.1:port, the Jobs API (RAY_ADDRESS for `ray job ...`)
    client_address: str | None  # ray://127.0.0.1:port when the Ray Client server runs
    num_nodes: int
    started_at: float
    auth: bool = True  # Ray token authentication (RAY_AUTH_MODE=token)
    logs: list[str] = field(default_factory=list)

    @property
    def session_logs(self) -> str:
        return os.path.join(self.temp_dir, "session_latest", "logs")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_private_token(path: Path) -> str:
    """The token in ``path``, after checking (on the open file, so nothing can swap it in between)
    that it is a regular file owned by this user that nobody else can write; a file others can
    read is chmod-ed to 0600, with a warning."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise ClusterError(f"cannot read the Ray auth token {path}: {e.strerror} (a symlink is not accepted)") from e
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ClusterError(f"the Ray auth token {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise ClusterError(f"the Ray auth token {path} is owned by uid {st.st_uid}, not by you "
                               f"(uid {os.getuid()}): remove it or point RAY_AUTH_TOKEN_PATH at your own")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise ClusterError(f"the Ray auth token {path} has mode {mode:04o}: others can change it; remove it "
                               "(a new one is generated) or check its contents and `chmod 600` it")
        if mode & 0o044:
            os.fchmod(f.fileno(), 0o600)
            print(f"warning: the Ray auth token {path} was readable by other users (mode {mode:04o}); it is now "
                  "0600. If others may have read it, delete it and restart your Ray clusters to get a new one.",
                  file=sys.stderr)
        token = f.read().strip()
    if not token:
        raise ClusterError(f"the Ray auth token {path} is empty")
    return token


def auth_token(create: bool = False) -> str | None:
    """Ray's auth token, looked up as Ray does ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token); with ``create``, ~/.ray/auth_token is generated (0600) if there is none.
    A token file must be private (see the module docstring); otherwise ClusterError."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.path.lexists(path):
        return _read_private_token(path)
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: never overwrite a token that another Ray process just generated
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    return _read_private_token(path)


_LOOPBACK = ("127.", "::1", "::ffff:127.")


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket, from /proc/net/tcp{,6}."""
    out = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(fields[9])] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return out


def exposed_listeners(cluster_id: str) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every socket a process of this cluster listens on
    beyond loopback (0.0.0.0, ::, or a real interface)."""
    listening = _listening_sockets()
    found = set()
    for pid, _ in cluster_processes(cluster_id):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                addr = listening.get(int(target[8:-1]))
                if addr and not addr[0].startswith(_LOOPBACK):
                    found.add((addr[0], addr[1], pid, name))
    return sorted(found)


def no_auth_warning(exposed: list[tuple[str, int, int, str]]) -> str | None:
    """The warning for a cluster without token auth, or None if nothing listens beyond loopback."""
    if not exposed:
        return None
    where = ", ".join(f"{name} on {addr}:{port}" for addr, port, _, name in exposed[:8])
    more = f" and {len(exposed) - 8} more" if len(exposed) > 8 else ""
    return (f"WARNING: --no-auth: this cluster's Ray processes listen beyond loopback ({where}{more}) and "
            "Ray 2.60 cannot bind them to 127.0.0.1; without token auth anyone who can reach this machine "
            "can run code as you. Use token auth (drop --no-auth) or firewall these ports.")


def auth_headers(cluster: LocalCluster | None = None) -> dict[str, str]:
    """HTTP headers for the dashboard / Jobs API (``JobSubmissionClient(url, headers=...)``)."""
    if cluster is not None and not cluster.auth:
        return {}
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(cluster: LocalCluster):
    """A ``JobSubmissionClient`` for this cluster (with the auth header)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url, headers=auth_headers(cluster))


def _state_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / STATE_FILE


def load(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> LocalCluster | None:
    """The cluster recorded in ``state_dir``, or None."""
    path = _state_path(state_dir)
    if not path.exists():
        return None
    return LocalCluster(**json.loads(path.read_text()))


def _ray_bin() -> str:
    exe = Path(sys.executable).parent / "ray"
    if exe.exists():
        return str(exe)
    found = shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed: pip install -c constraints.txt -e .")
    return found


def check_dashboard_deps() -> None:
    """Raise ClusterError naming what is missing for the dashboard / Jobs API."""
    missing = []
    for mod in ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "prometheus_client"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ClusterError(
            f"the Ray dashboard / Jobs API needs ray[default] (missing: {', '.join(missing)}): "
            "pip install -c constraints.txt 'ray[default]==2.60.0'"
        )


def _cluster_env(cluster_id: str, auth: bool) -> dict[str, str]:
    env = dict(os.environ)
    # This interpreter's bin dir first: entrypoints' `python` is the project's venv python.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if (Path(bindir).parent / "pyvenv.cfg").exists():
        env["VIRTUAL_ENV"] = str(Path(bindir).parent)
    env[MARKER_ENV] = cluster_id
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    env["RAY_AUTH_MODE"] = "token" if auth else "disabled"
    env.pop("RAY_ADDRESS", None)
    return env


def _run_ray_start(args: list[str], env: dict[str, str], log_path: Path, timeout: float) -> None:
    with open(log_path, "ab") as log:
        proc = subprocess.run(
            [_ray_bin(), "start", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            start_new_session=True,  # Ctrl-C in the caller's terminal does not hit the cluster
        )
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise ClusterError(
            f"`ray start {args[0]}` failed (exit {proc.returncode}); log {log_path}:\n" + "\n".join(tail)
        )


def _wait_http(url: str, timeout: float, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:  # URLError is an OSError
            last = e
        time.sleep(0.5)
    raise ClusterError(f"dashboard at {url} did not answer within {timeout:.0f}s ({last})")


def _temp_root() -> str:
    # Ray puts Unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store (~62 more bytes).
    base = tempfile.gettempdir()
    if len(base) > 30:
        base = "/tmp"
    return tempfile.mkdtemp(prefix="ray-emo-", dir=base)


def up(
    state_dir: str | os.PathLike = DEFAULT_STATE_DIR,
    workers: int = 0,
    num_cpus: int | None = None,
    worker_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_mb: int | None = 512,
    timeout: float = 120.0,
    auth: bool = True,
    watch_pid: int | None = None,
) -> LocalCluster:
    """Start a head node (+ ``workers`` worker nodes) and record it in ``state_dir``.

    With ``watch_pid`` (tests pass their own pid) a small watchdog process stops the cluster if
    that process dies without calling :func:`down`, e.g. a test run killed with SIGKILL."""
    check_dashboard_deps()
    existing = load(state_dir)
    if existing is not None:
        if cluster_processes(existing.cluster_id):
            raise ClusterError(
                f"a local cluster is already running ({existing.dashboard_url}, state {_state_path(state_dir)}): "
                "run `python -m cluster.local down` first"
            )
        _state_path(state_dir).unlink()  # stale state from a cluster that is gone
    os.makedirs(state_dir, exist_ok=True)

    cluster_id = uuid.uuid4().hex[:12]
    temp_dir = _temp_root()
    if auth:
        auth_token(create=True)
    env = _cluster_env(cluster_id, auth)
    log_path = Path(state_dir).resolve() / "ray-start.log"
    log_path.write_text("")
    dash_port = free_port()
    common = ["--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    if object_store_mb:
        common.append(f"--object-store-memory={object_store_mb * 1024 * 1024}")
    head = [
        "--head",
        "--node-ip-address=127.0.0.1",
        "--port=0",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        *common,
    ]
    client_address = None
    try:
        import grpc  # noqa: F401  (the Ray Client server needs it; `ray start` refuses the port otherwise)

        client_port = free_port()
        head.append(f"--ray-client-server-port={client_port}")
        client_address = f"ray://127.0.0.1:{client_port}"
    except ImportError:
        pass
    if num_cpus is not None:
        head.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        head.append(f"--num-gpus={num_gpus}")

    cluster = LocalCluster(
        cluster_id=cluster_id,
        state_dir=str(Path(state_dir).resolve()),
        temp_dir=temp_dir,
        gcs_address="",
        dashboard_url=f"http://127.0.0.1:{dash_port}",
        client_address=client_address,
        num_nodes=1 + workers,
        started_at=time.time(),
        auth=auth,
        logs=[str(log_path)],
    )
    # Record before starting so `down` can clean up even if start fails half way.
    _state_path(state_dir).write_text(json.dumps(asdict(cluster), indent=2))
    try:
        _run_ray_start(head, env, log_path, timeout)
        address_file = Path(temp_dir) / "ray_current_cluster"
        cluster.gcs_address = address_file.read_text().strip()
        for _ in range(workers):
            node = [
                f"--address={cluster.gcs_address}",
                "--node-ip-address=127.0.0.1",
                f"--dashboard-agent-listen-port={free_port()}",
                *common,
            ]
            if worker_cpus is not None:
                node.append(f"--num-cpus={worker_cpus}")
            if num_gpus is not None:
                node.append(f"--num-gpus={num_gpus}")
            _run_ray_start(node, env, log_path, timeout)
        _wait_http(cluster.dashboard_url + "/api/version", timeout, auth_headers(cluster))
        _wait_nodes(cluster, 1 + workers, timeout)
    except BaseException:
        down(state_dir)
        raise
    _state_path(state_dir).write_text(json.dumps(asdict(cluster), indent=2))
    if watch_pid:
        subprocess.Popen(
            [sys.executable, "-m", "cluster.local", "watch", "--state-dir", cluster.state_dir, "--pid", str(watch_pid)],
            cwd=str(Path(__file__).resolve().parents[1]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    return cluster


def watch(state_dir: str | os.PathLike, pid: int, interval: float = 2.0) -> None:
    """Stop the cluster in ``state_dir`` once process ``pid`` is gone; return early if the cluster
    is stopped (its state file removed) first."""
    while _state_path(state_dir).exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            down(state_dir)
            return
        time.sleep(interval)


def _wait_nodes(cluster: LocalCluster, expected: int, timeout: float) -> None:
    """Wait until the dashboard sees every node alive (worker nodes register asynchronously)."""
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(cluster.dashboard_url + "/nodes?view=summary", headers=auth_headers(cluster))
            with urllib.request.urlopen(req, timeout=5) as r:
                nodes = json.load(r)["data"]["summary"]
            alive = sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")
            if alive >= expected:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise ClusterError(f"only {alive} of {expected} Ray nodes came up within {timeout:.0f}s")


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks), from /proc (Linux)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def cluster_processes(cluster_id: str) -> set[tuple[int, int]]:
    """(pid, start time) of every process of this cluster: those whose environment carries the
    marker, plus all their descendants (setproctitle, as the dashboard's module processes use,
    overwrites /proc/<pid>/environ, so the marker alone misses some)."""
    needle = f"{MARKER_ENV}={cluster_id}".encode() + b"\0"
    table = _proc_table()
    me = os.getpid()
    found: set[int] = set()
    for pid in table:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read() + b"\0":
                    found.add(pid)
        except OSError:  # gone, or not ours to read
            continue
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != me:
                found.add(child)
                todo.append(child)
    return {(pid, table[pid][1]) for pid in found}


def _alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    table = _proc_table()
    return {(pid, start) for pid, start in procs if pid in table and table[pid][1] == start}


def _signal_all(procs: set[tuple[int, int]], sig: int) -> None:
    for pid, _ in procs:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def down(state_dir: str | os.PathLike = DEFAULT_STATE_DIR, grace: float = 3.0, keep_logs: bool = False) -> bool:
    """Stop the cluster recorded in ``state_dir``: only its own processes. Returns False if
    there was nothing recorded."""
    cluster = load(state_dir)
    if cluster is None:
        return False
    procs = cluster_processes(cluster.cluster_id)
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while procs and time.monotonic() < deadline:
        time.sleep(0.2)
        procs = _alive(procs) | cluster_processes(cluster.cluster_id)
    if procs:
        _signal_all(procs, signal.SIGKILL)
        for _ in range(50):
            procs = _alive(procs)
            if not procs:
                break
            time.sleep(0.1)
    if not keep_logs:
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    _state_path(state_dir).unlink(missing_ok=True)
    return True


def status(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> dict:
    cluster = load(state_dir)
    if cluster is None:
        return {"running": False}
    procs = cluster_processes(cluster.cluster_id)
    return {"running": bool(procs), "processes": len(procs), **asdict(cluster)}


def env_exports(cluster: LocalCluster) -> str:
    """Shell exports that point `ray job ...`, JobSubmissionClient and ray.init at this cluster."""
    lines = [f"export RAY_ADDRESS={cluster.dashboard_url}"]
    lines.append(f"export RAY_AUTH_MODE={'token' if cluster.auth else 'disabled'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "url", "env", "watch"])
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where cluster.json lives (default %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="extra worker nodes on this machine (default 0)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the head node (default: all cores)")
    p.add_argument("--worker-cpus", type=int, default=None, help="logical CPUs per worker node (default: all cores)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs per node (default: detected)")
    p.add_argument("--no-auth", action="store_true",
                   help="up: disable Ray token authentication (warns if Ray listens beyond loopback)")
    p.add_argument("--keep-logs", action="store_true", help="down: keep the Ray temp dir with the session logs")
    p.add_argument("--pid", type=int, help="watch: stop the cluster when this process exits")
    args = p.parse_args(argv)
    try:
        if args.command == "up":
            c = up(args.state_dir, args.workers, args.num_cpus, args.worker_cpus, args.num_gpus, auth=not args.no_auth)
            if not c.auth:
                warning = no_auth_warning(exposed_listeners(c.cluster_id))
                if warning:
                    print(warning, file=sys.stderr)
            print(f"Ray cluster up: {c.num_nodes} node(s), GCS {c.gcs_address}")
            print(f"  dashboard / Jobs API: {c.dashboard_url}")
            if c.client_address:
                print(f"  Ray Client:           {c.client_address}")
            print(f"  logs:                 {c.session_logs}")
            print(f'  use it:  eval "$(python -m cluster.local env --state-dir {args.state_dir})"')
            print("           ray job submit --working-dir . -- python -m jobs.train --help")
            print(f"  stop:    python -m cluster.local down --state-dir {args.state_dir}")
        elif args.command == "watch":
            if not args.pid:
                p.error("watch needs --pid")
            watch(args.state_dir, args.pid)
        elif args.command == "down":
            stopped = down(args.state_dir, keep_logs=args.keep_logs)
            print("Ray cluster stopped" if stopped else f"no local cluster recorded in {args.state_dir}")
        elif args.command in ("url", "env"):
            c = load(args.state_dir)
            if c is None:
                raise ClusterError(f"no local cluster recorded in {args.state_dir}: run `python -m cluster.local up`")
            print(c.dashboard_url if args.command == "url" else env_exports(c))
        else:
            print(json.dumps(status(args.state_dir), indent=2))
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
