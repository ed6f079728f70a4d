"""A NATS cluster of N nats-servers on this machine (`pdserve up --nats-cluster N`, and the tests).

Every service is given all the nodes' URLs (`--nats nats://a:4222,nats://b:4222,...`); when the node it is
connected to dies, nats-py moves on to the next URL of its list (it also learns the others from the server's
INFO) and the service carries on there (bus.py).

Algorithm of start_cluster():
1. Node 0 starts; its client, route and monitoring ports are free ones the server bound itself (`-1`, read back
   from its ports file: no race with other processes). Node i starts with routes to nodes 0..i-1, whose route
   URLs are known by then.
2. So every pair of nodes is joined by a route the later node solicits, and a node retries the routes it was
   given forever: a node that dies and comes back on the same ports (NatsServer.restart, as pdserve up's
   supervisor does) rejoins without any change to the others.
3. Wait until every node's /routez names every other node, within a deadline, then return.

No JetStream on cluster nodes: pdserve uses none (plain publish/subscribe and request/reply; `grep -rn
jetstream libs services` finds nothing), and clustered JetStream would need a quorum of nodes to start or
restart. Routes carry a route identity with a fresh password, in each node's private config file. Each node
has HTTP monitoring on its own host (loopback for pdserve up): /routez tells when the cluster formed, /connz which
node a service is connected to; it shows connections' names and addresses, never a message.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Sequence

from pdserve.nats_server import ClusterSpec, NatsServer, NatsServerError, ServerAuth, start


@dataclass
class NatsCluster:
    """The nodes of one cluster, in start order. `url`: every node's client URL, comma-separated, as services
    take it (--nats); `stop()` ends every node and removes the store it made."""

    name: str
    nodes: list[NatsServer]
    store_dir: str
    log_files: list[str | None]
    _own_store: bool

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def node_of(self, client_name: str, timeout_s: float = 2.0) -> NatsServer | None:
        """The node a client named client_name (pdserve's services connect under their id) is connected to."""
        for node in self.nodes:
            if node.process.poll() is None and client_name in client_names(node, timeout_s):
                return node
        return None

    def wait_formed(self, timeout_s: float = 15.0) -> None:
        """Return once every live node has a route to every other live node; NatsServerError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        missing: dict[str, set[str]] = {}
        while True:
            live = [node for node in self.nodes if node.process.poll() is None]
            names = {node.cluster.server_name for node in live}
            missing = {node.cluster.server_name: names - {node.cluster.server_name} - route_names(node, timeout_s=1.0)
                       for node in live}
            if not any(missing.values()):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        lacking = "; ".join(f"{name} has no route to {', '.join(sorted(others))}" for name, others in missing.items()
                            if others)
        raise NatsServerError(f"NATS cluster {self.name} did not form within {timeout_s:.0f}s ({lacking}); read the "
                              f"nodes' logs ({', '.join(p for p in self.log_files if p) or 'pass log_dir'})")

    def stop(self, timeout_s: float = 5.0) -> None:
        for node in self.nodes:
            node.stop(timeout_s)
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)


def start_cluster(
    num_nodes: int, *, hosts: Sequence[str] = ("127.0.0.1",), store_dir: str | None = None,
    log_dir: str | None = None, timeout_s: float = 15.0, die_with_parent: bool = False,
    auth: ServerAuth | None = None, authorization: str | None = None, max_payload: int | None = None,
) -> NatsCluster:
    """Start num_nodes nats-servers forming one cluster and wait until it formed; node i listens on
    hosts[i % len(hosts)]. auth / authorization / max_payload go to every node alike (a client's identity must
    work on whichever node it reaches); log_dir: node i logs to log_dir/nats-server-i.log."""
    if num_nodes < 1:
        raise ValueError(f"a cluster of {num_nodes} nodes: give at least 1")
    own_store = store_dir is None
    store_dir = store_dir or tempfile.mkdtemp(prefix="pdserve-nats-cluster-")
    # Unique per cluster: two systems on one machine never join each other's cluster.
    name = f"pdserve-{secrets.token_hex(4)}"
    route_password = secrets.token_hex(16)
    log_files = [os.path.join(log_dir, f"nats-server-{i}.log") if log_dir else None for i in range(num_nodes)]
    cluster = NatsCluster(name, [], store_dir, log_files, own_store)
    try:
        for i in range(num_nodes):
            spec = ClusterSpec(name=name, server_name=f"{name}-{i}", route_password=route_password,
                               routes=tuple(node.cluster_url for node in cluster.nodes))
            cluster.nodes.append(start(
                host=hosts[i % len(hosts)], store_dir=os.path.join(store_dir, f"node-{i}"), log_file=log_files[i],
                die_with_parent=die_with_parent, auth=auth, authorization=authorization, max_payload=max_payload,
                jetstream=False, monitoring=True, cluster=spec, timeout_s=timeout_s))
        cluster.wait_formed(timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def route_names(node: NatsServer, timeout_s: float = 2.0) -> set[str]:
    """Server names of the nodes `node` has a route to (empty when its monitoring does not answer)."""
    routez = _monitor(node, "routez", timeout_s)
    return {route.get("remote_name", "") for route in (routez or {}).get("routes") or []}


def client_names(node: NatsServer, timeout_s: float = 2.0) -> list[str]:
    """Names of the clients connected to `node` (empty when its monitoring does not answer)."""
    connz = _monitor(node, "connz?limit=4096", timeout_s)
    return [conn.get("name", "") for conn in (connz or {}).get("connections") or []]


def _monitor(node: NatsServer, path: str, timeout_s: float) -> dict | None:
    if not node.monitor_url:
        raise NatsServerError(f"nats-server {node.url} has no monitoring port; start it with monitoring=True")
    try:
        with urllib.request.urlopen(f"{node.monitor_url}/{path}", timeout=timeout_s) as response:
            return json.loads(response.read())
    except (OSError, ValueError):  # down, restarting, or not answering in time
        return None
