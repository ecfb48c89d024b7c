"""A real multi-node Ray cluster on one machine: a head plus worker nodes, each its own raylet with its own
temp dir, ports and resources, all on loopback with Ray's token authentication on.

For users (through `cluster/two_nodes.sh`) and for the `cluster` tests and `benchmarks/two_nodes.py`:

    python cluster/local_cluster.py up --nodes 2 --cpus-per-node 1     # prints the exports, pids, state file
    python cluster/local_cluster.py down /tmp/dume-cluster-XXXX/cluster.json

    from cluster.local_cluster import LocalCluster                       # repository root on sys.path
    with LocalCluster(head_cpus=1) as c:
        node = c.add_node(num_cpus=1)
        ... c.address (the dashboard / Jobs API), c.env (RAY_AUTH_TOKEN and PATH for the `ray` CLI)
        node.kill()                                                       # SIGKILL its raylet and its workers

Every node is one `ray start --block` in its own session (process group), so a node is stopped by its process
ids only: the group, then every descendant of the `ray start` process that left it, then anything still
naming the node's temp dir. Never `ray stop`, which stops every Ray instance on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the `ray` CLI of this Python's environment
HEAD_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port")
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


_HANDED_OUT: set[int] = set()  # ports this process gave a node already: a closed socket's port can come back


def free_ports(n: int) -> list[int]:
    """`n` free loopback ports, none handed out before by this process (the head's and then its raylet's ports
    are picked in two calls; the OS may offer a port of the first call again once its probe socket is closed)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            ports.append(port)
    return ports


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _parent(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Ray workers are children of their raylet, which renames them `ray::...`)."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        children.setdefault(_parent(p), []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains `text` (a node's unique temp dir)."""
    return [p for p in _all_pids() if p != os.getpid() and text.encode() in _cmdline(p)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class LocalNode:
    """One `ray start --block` (head or worker) and the processes it started."""

    def __init__(self, name: str, temp_dir: str, proc: subprocess.Popen, log_path: str):
        self.name, self.temp_dir, self.proc, self.log_path = name, temp_dir, proc, log_path
        self.pid = proc.pid  # `ray start --block`, leader of the node's process group

    def raylet_pid(self) -> Optional[int]:
        for pid in pids_naming(self.temp_dir):
            argv0 = _cmdline(pid).split(b"\0")[0]
            if argv0.endswith(b"/raylet"):
                return pid
        return None

    def node_id(self) -> Optional[str]:
        pid = self.raylet_pid()
        for arg in _cmdline(pid).split(b"\0") if pid else []:
            if arg.startswith(b"--node_id="):
                return arg.split(b"=", 1)[1].decode()
        return None

    def runs(self, pid: Optional[int]) -> bool:
        """Whether process `pid` belongs to this node (its ancestors include this node's `ray start`)."""
        seen = 0
        while pid and pid > 1 and seen < 64:
            if pid == self.pid:
                return True
            pid, seen = _parent(pid), seen + 1
        return False

    def pids(self) -> list[int]:
        """The node's processes: `ray start`, its descendants (raylet, GCS, agents, workers), any naming its temp dir."""
        found = {self.pid, *descendants(self.pid), *pids_naming(self.temp_dir)}
        return sorted(p for p in found if _alive(p))

    def kill(self) -> list[int]:
        """Lose the node at once: SIGKILL its raylet and every worker below it, then the rest of the node.
        Returns the pids killed."""
        raylet = self.raylet_pid()
        first = [raylet, *descendants(raylet)] if raylet else []
        _kill(first, signal.SIGKILL)
        rest = self.pids()
        _kill(rest, signal.SIGKILL)
        self.wait_gone(10)
        return first + rest

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            _kill(self.pids(), sig)  # anything that left the group (workers, agents)
            if self.wait_gone(wait):
                break

    def wait_gone(self, seconds: float) -> bool:
        end = time.time() + seconds
        while time.time() < end:
            if self.proc.poll() is not None and not self.pids():
                return True
            time.sleep(0.3)
        return self.proc.poll() is not None and not self.pids()

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()[-n:]
        except OSError:
            return ""


class LocalCluster:
    """A head on loopback (dashboard + Jobs API, token auth) and any number of worker nodes joined to it."""

    def __init__(self, head_cpus: int = 1, head_resources: Optional[dict] = None, token: Optional[str] = None,
                 root: Optional[str] = None):
        self.root = root or tempfile.mkdtemp(prefix="dume-cluster-", dir="/tmp")  # short: socket paths < 108 chars
        self.token = token or secrets.token_hex(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PYTHONUNBUFFERED": "1"})
        self.env = env
        self.nodes: list[LocalNode] = []
        ports = dict(zip(HEAD_PORT_FLAGS, free_ports(len(HEAD_PORT_FLAGS))))
        self.gcs_address = f"127.0.0.1:{ports['--port']}"
        self.address = f"http://127.0.0.1:{ports['--dashboard-port']}"  # what RAY_ADDRESS / `ray job --address` take
        try:
            self.head = self._start("head", head_cpus, head_resources,
                                    ["--head", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                                     *[str(x) for kv in ports.items() for x in kv]])
            self._wait_dashboard()
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, num_cpus: int, resources: Optional[dict], extra: list[str]) -> LocalNode:
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir, exist_ok=True)
        ports = dict(zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS))))
        cmd = [f"{BIN}/ray", "start", "--block", "--num-cpus", str(int(num_cpus)), "--num-gpus", "0",  # whole CPUs only
               "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir, "--disable-usage-stats",
               "--min-worker-port", "0", "--max-worker-port", "0",  # random: several raylets share this machine
               *[str(x) for kv in ports.items() for x in kv], *extra]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        log_path = os.path.join(temp_dir, "ray_start.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    stdin=subprocess.DEVNULL)
        node = LocalNode(name, temp_dir, proc, log_path)
        self.nodes.append(node)
        return node

    def _wait_dashboard(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                self.api("/api/version")
                return
            except OSError:
                if self.head.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start --head failed:\n{self.head.log_tail()}")
                time.sleep(1)

    def api(self, path: str) -> dict:
        request = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> dict[str, dict]:
        """{node id: total resources} of the nodes the GCS holds alive (through the dashboard's state API)."""
        data = self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        return {n["node_id"]: n.get("resources_total", {}) for n in data if n["state"] == "ALIVE"}

    def add_node(self, num_cpus: int = 1, resources: Optional[dict] = None, timeout: float = 240,
                 attempts: int = 3) -> LocalNode:
        """Start a worker node (a second raylet) joined to the head; returns once the GCS lists it alive.
        `ray start` gives a raylet 30 s to register, which a loaded machine can miss: then it is retried."""
        name = f"node{len(self.nodes)}"
        for attempt in range(1, attempts + 1):
            node = self._start(name, num_cpus, resources, ["--address", self.gcs_address])
            deadline = time.time() + timeout
            while True:
                node_id = node.node_id()
                try:
                    if node_id and node_id in self.alive_nodes():
                        return node
                except (OSError, KeyError, ValueError):
                    pass
                if node.proc.poll() is not None or time.time() > deadline:
                    break
                time.sleep(1)
            tail = node.log_tail()
            node.stop()
            self.nodes.remove(node)
            if attempt == attempts:
                raise RuntimeError(f"ray start --address {self.gcs_address} failed {attempts} times:\n{tail}")
            print(f"[local_cluster] {name} did not come up (attempt {attempt}), retrying", flush=True)
        raise AssertionError("unreachable")

    def job(self, command: str, *args: str, cwd: Optional[str] = None, timeout: float = 900) -> subprocess.CompletedProcess:
        """`ray job <command> --address <head> ...` as a user types it (from `cwd`, default the repository root).
        A fresh head's dashboard answers before its job agent is up ("No available agent"): retried for 2 min."""
        deadline = time.time() + 120
        while True:
            result = subprocess.run([f"{BIN}/ray", "job", command, "--address", self.address, *args], env=self.env,
                                    cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in result.stderr or time.time() > deadline:
                return result
            time.sleep(3)

    def stop(self) -> None:
        """Stop every node (workers first), by process id, and remove the temp dirs."""
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def state(self) -> dict:
        return {"address": self.address, "gcs_address": self.gcs_address, "token": self.token, "root": self.root,
                "nodes": [{"name": n.name, "pid": n.pid, "temp_dir": n.temp_dir, "node_id": n.node_id(),
                           "raylet_pid": n.raylet_pid()} for n in self.nodes]}

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def down(state_file: str) -> None:
    """Stop a cluster `up` started: each node's process group, its descendants, whatever names its temp dir."""
    with open(state_file) as f:
        state = json.load(f)
    for node in reversed(state["nodes"]):
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(node["pid"], sig)
            except (ProcessLookupError, PermissionError):
                pass
            pids = [p for p in {node["pid"], *descendants(node["pid"]), *pids_naming(node["temp_dir"])} if _alive(p)]
            _kill(pids, sig)
            end = time.time() + wait
            while time.time() < end and [p for p in pids_naming(node["temp_dir"]) if _alive(p)] + \
                    ([node["pid"]] if _alive(node["pid"]) else []):
                time.sleep(0.3)
        print(f"stopped {node['name']} (pid {node['pid']})")
    shutil.rmtree(state["root"], ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes; they keep running after this exits")
    up.add_argument("--nodes", type=int, default=2, help="nodes in all, the head included")
    up.add_argument("--cpus-per-node", type=int, default=1)
    up.add_argument("--token", default=os.environ.get("RAY_AUTH_TOKEN"), help="default: a fresh random token")
    stop = sub.add_parser("down", help="stop a cluster `up` started, by its process ids")
    stop.add_argument("state_file")
    args = parser.parse_args(argv)
    if args.command == "down":
        down(args.state_file)
        return 0
    cluster = LocalCluster(head_cpus=args.cpus_per_node, token=args.token)
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
    except BaseException:
        cluster.stop()
        raise
    state = cluster.state()
    state_file = os.path.join(cluster.root, "cluster.json")
    with open(state_file, "w") as f:
        json.dump(state, f, indent=2)
    print(f"export RAY_ADDRESS={state['address']}")
    print(f"export RAY_AUTH_TOKEN={state['token']}")
    print("export RAY_AUTH_MODE=token  # for `ray status` and drivers; `ray job` needs only the token")
    for node in state["nodes"]:
        print(f"# {node['name']}: ray start pid {node['pid']}, raylet pid {node['raylet_pid']}, node id {node['node_id']}")
    print(f"# nodes: ray status --address {state['gcs_address']}   (the GCS; RAY_ADDRESS is the Jobs API)")
    print(f"# stop: python cluster/local_cluster.py down {state_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
