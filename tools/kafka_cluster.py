"""Apache Kafka for development, tests and campaigns: resolved from Maven Central, run from its jars.

A single KRaft node or an N-broker cluster (every node broker and controller) on free loopback ports, with
optional TLS (a CA made here with openssl) and SASL/SCRAM-SHA-512 with ACLs (StandardAuthorizer). Standard
library only, so `scripts/kafka` runs before any virtual environment exists.

    scripts/kafka start [--brokers N] [--tls] [--sasl] [--dir DIR]   prints one line: bootstrap=HOST:PORT,...
    scripts/kafka stop [--dir DIR]
    scripts/kafka acl PRINCIPAL TYPE PATTERN NAME OPS [--dir DIR]
    scripts/kafka tools                                               prints the folder of Kafka's CLI tools

The cluster folder (default `.kafka/cluster` in the repository, or STREAMER_KAFKA_DIR) keeps everything:
`cluster.json` (ports, pids, users, CA), `client.properties` (an admin client's settings), `logs/` (one
log per broker) and `data/`. The jars are resolved once into ~/.cache/streamer/apache-kafka (or
STREAMER_KAFKA_CACHE); Maven keeps its own download cache in ~/.m2.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent / "kafka"
REPO = HERE.parent.parent
POM = HERE / "pom.xml"
ADMIN_SRC = HERE / "ClusterAdmin.java"
MECHANISM = "SCRAM-SHA-512"
# Loopback test clusters only: fixed, documented credentials (docs/development.md, "Apache Kafka for tests").
USERS = {"admin": "admin-secret", "streamer": "streamer-secret", "intruder": "intruder-secret"}
SUPER_USER = "admin"


def unsecured_jwt(subject: str, lifetime_s: float = 3600.0) -> str:
    """An unsigned JWT (alg none), which only Kafka's unsecured OAUTHBEARER validator accepts."""
    import base64

    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    now = time.time()
    return f"{part({'alg': 'none'})}.{part({'sub': subject, 'iat': now - 60, 'exp': now + lifetime_s})}."


class KafkaClusterError(RuntimeError):
    pass


# -- the jars ---------------------------------------------------------------------------------------
def _cache_root() -> Path:
    return Path(os.environ.get("STREAMER_KAFKA_CACHE") or Path.home() / ".cache" / "streamer" / "apache-kafka")


def resolve_jars(quiet: bool = True) -> Path:
    """The folder holding Apache Kafka's jars and the compiled admin helper, resolved once per pom."""
    digest = hashlib.sha256(POM.read_bytes() + ADMIN_SRC.read_bytes()).hexdigest()[:16]
    root = _cache_root()
    target = root / digest
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one resolver at a time (parallel test runs, scripts)
        if (target / ".complete").is_file():
            return target
        for tool in ("mvn", "java", "javac"):
            if shutil.which(tool) is None:
                raise KafkaClusterError(f"{tool} not found: Apache Kafka needs Java 17+ and Maven on PATH")
        tmp = root / f".{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "classes").mkdir(parents=True)
        print("[kafka] resolving Apache Kafka from Maven Central (once per machine)", file=sys.stderr)
        cmd = ["mvn", "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
               f"-DoutputDirectory={tmp / 'lib'}", "-DincludeScope=runtime"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise KafkaClusterError(f"maven could not resolve {POM}: {(done.stdout + done.stderr)[-2000:]}")
        done = subprocess.run(["javac", "-d", str(tmp / "classes"), "-cp", f"{tmp / 'lib'}/*", str(ADMIN_SRC)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise KafkaClusterError(f"javac failed on {ADMIN_SRC}: {done.stderr[-2000:]}")
        (tmp / ".complete").write_text(digest)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _classpath(jars: Path) -> str:
    return f"{jars / 'lib'}/*:{jars / 'classes'}"


# Kafka's own command-line tools, as its bin/*.sh scripts run them (the classes of Kafka 4.x).
TOOLS = {"kafka-topics": "org.apache.kafka.tools.TopicCommand",
         "kafka-acls": "org.apache.kafka.tools.AclCommand",
         "kafka-configs": "org.apache.kafka.tools.ConfigCommand",
         "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
         "kafka-console-producer": "org.apache.kafka.tools.ConsoleProducer"}
TOOLS_LOG4J = """\
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
"""


def tools_bin(jars: Path | None = None) -> Path:
    """A folder of wrappers named as Kafka's scripts (kafka-topics.sh and kafka-topics, ...) that run its
    tools from the resolved jars: put it on PATH and the commands `streamer topics` / `streamer acls`
    print run as printed."""
    jars = jars or resolve_jars()
    folder = jars / "bin"
    folder.mkdir(exist_ok=True)
    (folder / "tools-log4j2.properties").write_text(TOOLS_LOG4J)
    for name, main_class in TOOLS.items():
        script = ("#!/bin/sh\n# Apache Kafka's " + name + " (written by tools/kafka_cluster.py)\n"
                  f'exec java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 '
                  f'-Dlog4j2.configurationFile="{folder / "tools-log4j2.properties"}" '
                  f'-cp "{jars / "lib"}/*" {main_class} "$@"\n')
        for file_name in (f"{name}.sh", name):
            path = folder / file_name
            path.write_text(script)
            path.chmod(0o755)
    return folder


# -- ports, TLS material ------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_pki(folder: Path, password: str) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 and localhost, PEM: what Kafka's PEM key store reads."""
    folder.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise KafkaClusterError(f"openssl {args[0]} failed: {done.stderr[-500:]}")

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "30",
        "-subj", "/CN=streamer test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "30", "-extfile", "san.cnf")
    # Kafka's PEM key store wants an encrypted PKCS#8 key followed by the certificate chain.
    ssl("pkcs8", "-topk8", "-v1", "PBE-SHA1-3DES", "-in", "server.key", "-out", "server.enc.key",
        "-passout", f"pass:{password}")
    (folder / "server.pem").write_text((folder / "server.enc.key").read_text() + (folder / "server.crt").read_text())
    return {"ca": str(folder / "ca.pem"), "keystore": str(folder / "server.pem")}


# -- the cluster ------------------------------------------------------------------------------------
LOG4J = """\
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
"""


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class KafkaCluster:
    """Apache Kafka on loopback. `start()` formats (first time) and launches every node, then waits until
    the cluster answers metadata requests; `stop()` ends them. Nodes are numbered from 1."""

    def __init__(self, folder: Path | str, brokers: int = 1, tls: bool = False, sasl: bool = False,
                 die_with_parent: bool = True, heap_mb: int = 384, extra_config: dict[str, str] | None = None):
        self.folder = Path(folder).resolve()
        self.brokers, self.tls, self.sasl = brokers, tls, sasl
        self.die_with_parent, self.heap_mb = die_with_parent, heap_mb
        self.extra_config = extra_config or {}
        self.processes: dict[int, subprocess.Popen] = {}
        self.info: dict = {}

    # what clients need
    @property
    def security_protocol(self) -> str:
        return {(False, False): "PLAINTEXT", (True, False): "SSL", (False, True): "SASL_PLAINTEXT",
                (True, True): "SASL_SSL"}[(self.tls, self.sasl)]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n['port']}" for n in self.info["nodes"].values())

    def client_settings(self, user: str = SUPER_USER) -> dict:
        """KafkaSettings fields (streamer.settings) for a client of this cluster as `user`."""
        out: dict = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.tls:
            out["ssl_cafile"] = self.info["tls"]["ca"]
        if self.sasl:
            out.update(sasl_mechanism=MECHANISM, sasl_username=user, sasl_password=USERS[user])
        return out

    def oauth_client_settings(self, user: str, token_file: Path, lifetime_s: float = 3600.0) -> dict:
        """KafkaSettings fields for an OAUTHBEARER client as `user`, its unsecured JWT written to token_file
        (a negative lifetime writes an expired one)."""
        token_file.write_text(unsecured_jwt(user, lifetime_s))
        out = self.client_settings(user)
        for name in ("sasl_username", "sasl_password"):
            out.pop(name, None)
        out.update(sasl_mechanism="OAUTHBEARER", sasl_oauth_token_file=str(token_file))
        return out

    def node_port(self, node: int) -> int:
        return self.info["nodes"][str(node)]["port"]

    # lifecycle
    def start(self, timeout_s: float = 90.0) -> "KafkaCluster":
        jars = resolve_jars()
        fresh = not (self.folder / "cluster.json").is_file()
        if fresh:
            self._lay_out()
        else:
            self.info = json.loads((self.folder / "cluster.json").read_text())
        for node in range(1, self.brokers + 1):
            if fresh:
                self._format(jars, node)
            self.start_node(node, jars)
        self.wait_ready(timeout_s)
        return self

    def _lay_out(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "logs").mkdir(exist_ok=True)
        ports = free_ports(2 * self.brokers)
        nodes = {str(i + 1): {"port": ports[2 * i], "controller_port": ports[2 * i + 1]} for i in range(self.brokers)}
        self.info = {"brokers": self.brokers, "tls": None, "sasl": self.sasl, "nodes": nodes,
                     "cluster_id": _cluster_id(), "key_password": uuid.uuid4().hex}
        if self.tls:
            self.info["tls"] = make_pki(self.folder / "tls", self.info["key_password"])
        if self.sasl:
            self.info["users"] = dict(USERS)
            self.info["mechanism"] = MECHANISM
        self.info["security_protocol"] = self.security_protocol
        self.info["bootstrap"] = self.bootstrap
        for node in range(1, self.brokers + 1):
            (self.folder / f"server-{node}.properties").write_text(self._server_properties(node))
            (self.folder / f"log4j2-{node}.properties").write_text(
                LOG4J.format(log=self.folder / "logs" / f"broker-{node}.log", level="WARN"))
        (self.folder / "client.properties").write_text(self._client_properties())
        self._save()

    def _save(self) -> None:
        tmp = self.folder / "cluster.json.tmp"
        tmp.write_text(json.dumps(self.info, indent=2))
        tmp.replace(self.folder / "cluster.json")

    def _server_properties(self, node: int) -> str:
        n = self.brokers
        me = self.info["nodes"][str(node)]
        voters = ",".join(f"{i}@127.0.0.1:{v['controller_port']}" for i, v in self.info["nodes"].items())
        rf, isr = min(3, n), min(2, n)
        props = {
            "process.roles": "broker,controller", "node.id": str(node),
            "controller.quorum.voters": voters, "controller.listener.names": "CONTROLLER",
            "listeners": f"CLIENT://127.0.0.1:{me['port']},CONTROLLER://127.0.0.1:{me['controller_port']}",
            "advertised.listeners": f"CLIENT://127.0.0.1:{me['port']}",
            "listener.security.protocol.map": f"CLIENT:{self.security_protocol},CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "CLIENT",
            "log.dirs": str(self.folder / "data" / f"node-{node}"),
            "num.partitions": "1", "default.replication.factor": str(rf), "min.insync.replicas": "1",
            "offsets.topic.replication.factor": str(rf), "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(rf), "transaction.state.log.min.isr": str(isr),
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": str(rf),
            "share.coordinator.state.topic.min.isr": str(isr),
            "group.initial.rebalance.delay.ms": "0", "auto.create.topics.enable": "false",
            # compaction visible within a test: small dirty ratio, frequent cleaner passes
            "log.cleaner.backoff.ms": "1000", "log.cleaner.min.cleanable.ratio": "0.1",
            "log.cleaner.dedupe.buffer.size": str(16 << 20),
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "5000",
            "transaction.remove.expired.transaction.cleanup.interval.ms": "60000",
        }
        if self.tls:
            props.update({
                "ssl.keystore.type": "PEM", "ssl.keystore.location": self.info["tls"]["keystore"],
                "ssl.key.password": self.info["key_password"],
                "ssl.truststore.type": "PEM", "ssl.truststore.location": self.info["tls"]["ca"],
                "ssl.endpoint.identification.algorithm": "https",
            })
        if self.sasl:
            admin_pw = USERS[SUPER_USER]
            props.update({
                # OAUTHBEARER beside SCRAM with Kafka's unsecured JWT validator (no signature: for tests of
                # token-file clients only); a token's "sub" is its principal
                "sasl.enabled.mechanisms": f"{MECHANISM},OAUTHBEARER",
                "sasl.mechanism.inter.broker.protocol": MECHANISM,
                f"listener.name.client.{MECHANISM.lower()}.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required "
                    f'username="{SUPER_USER}" password="{admin_pw}";',
                "listener.name.client.oauthbearer.sasl.jaas.config":
                    "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;",
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                # the controller listener is plaintext on loopback: its principal is ANONYMOUS
                "super.users": f"User:{SUPER_USER};User:ANONYMOUS",
                "allow.everyone.if.no.acl.found": "false",
            })
        props.update(self.extra_config)
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _client_properties(self) -> str:
        props = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        if self.tls:
            props.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": self.info["tls"]["ca"]})
        if self.sasl:
            props.update({"sasl.mechanism": MECHANISM, "sasl.jaas.config":
                          "org.apache.kafka.common.security.scram.ScramLoginModule required "
                          f'username="{SUPER_USER}" password="{USERS[SUPER_USER]}";'})
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, jars: Path, *args: str, heap_mb: int = 128) -> list[str]:
        return ["java", f"-Xmx{heap_mb}m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp",
                _classpath(jars), *args]

    def _format(self, jars: Path, node: int) -> None:
        args = ["kafka.tools.StorageTool", "format", f"--cluster-id={self.info['cluster_id']}",
                "-c", str(self.folder / f"server-{node}.properties"), "--ignore-formatted"]
        if self.sasl:
            for user, pw in USERS.items():
                args += ["--add-scram", f"{MECHANISM}=[name={user},password={pw}]"]
        done = subprocess.run(self._java(jars, *args), capture_output=True, text=True)
        if done.returncode != 0:
            raise KafkaClusterError(f"formatting node {node} failed: {(done.stdout + done.stderr)[-1500:]}")

    def start_node(self, node: int, jars: Path | None = None) -> None:
        """Launch one node (after a kill, on the same ports and data)."""
        jars = jars or resolve_jars()
        log = open(self.folder / "logs" / f"broker-{node}.out", "ab")
        cmd = ["java", f"-Xms{self.heap_mb}m", f"-Xmx{self.heap_mb}m", "-XX:+UseSerialGC",
               f"-Dlog4j2.configurationFile={self.folder / f'log4j2-{node}.properties'}",
               "-cp", _classpath(jars), "kafka.Kafka", str(self.folder / f"server-{node}.properties")]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if self.die_with_parent else None)
        self.processes[node] = proc
        self.info["nodes"][str(node)]["pid"] = proc.pid
        self._save()

    def wait_ready(self, timeout_s: float = 90.0, brokers: int | None = None) -> None:
        """Until `brokers` (default all) nodes answer a metadata request as the admin user."""
        jars = resolve_jars()
        deadline = time.monotonic() + timeout_s
        while True:
            for node, proc in self.processes.items():
                if proc.poll() is not None:
                    tail = _tail(self.folder / "logs" / f"broker-{node}.out") or _tail(
                        self.folder / "logs" / f"broker-{node}.log")
                    raise KafkaClusterError(f"broker {node} exited with {proc.returncode}: {tail}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise KafkaClusterError(f"Apache Kafka not ready within {timeout_s}s; logs in {self.folder / 'logs'}")
            done = subprocess.run(self._java(jars, "ClusterAdmin", "ready", str(self.folder / "client.properties"),
                                             str(brokers or self.brokers), str(min(left, 20.0))),
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return

    def acl(self, principal: str, resource_type: str, pattern: str, name: str, operations: str) -> None:
        self.acls([(principal, resource_type, pattern, name, operations)])

    def acls(self, specs: list[tuple[str, str, str, str, str]]) -> None:
        """Allow each (principal, resource type, pattern, name, "OP,OP") as the admin user, in one call."""
        done = subprocess.run(self._java(resolve_jars(), "ClusterAdmin", "acl", str(self.folder / "client.properties"),
                                         *("|".join(spec) for spec in specs)),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise KafkaClusterError(f"ACLs {specs}: {done.stderr[-800:]}")

    def pid(self, node: int) -> int | None:
        proc = self.processes.get(node)
        if proc is not None:
            return proc.pid if proc.poll() is None else None
        return self.info["nodes"][str(node)].get("pid")

    def _nodes(self, node: int | None) -> list[int]:
        return [node] if node is not None else [int(n) for n in self.info["nodes"]]

    @property
    def process(self) -> subprocess.Popen | None:
        """Node 1's process (a single-node cluster's only one)."""
        return self.processes.get(1)

    def kill(self, node: int | None = None) -> None:
        """SIGKILL one node (default: all): a broker crash. `start_node(node)` (or `start()` for all)
        brings it back on its ports and data."""
        for n in self._nodes(node):
            self._signal(n, signal.SIGKILL)
            proc = self.processes.get(n)
            if proc is not None:
                proc.wait(10)

    def _signal(self, node: int, sig: int) -> None:
        pid = self.pid(node)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def freeze(self, node: int | None = None) -> None:
        """SIGSTOP one node (default: all): a stalled broker."""
        for n in self._nodes(node):
            self._signal(n, signal.SIGSTOP)

    def thaw(self, node: int | None = None) -> None:
        for n in self._nodes(node):
            self._signal(n, signal.SIGCONT)

    def stop(self, timeout_s: float = 20.0) -> None:
        if not self.info:
            f = self.folder / "cluster.json"
            if not f.is_file():
                return
            self.info = json.loads(f.read_text())
        pids = [int(n["pid"]) for n in self.info["nodes"].values() if n.get("pid")]
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                for proc in self.processes.values():
                    if proc.pid == pid:
                        proc.poll()
                time.sleep(0.1)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.processes.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for n in self.info["nodes"].values():
            n.pop("pid", None)
        if self.folder.is_dir():
            self._save()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "KafkaCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cluster_id() -> str:
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# -- the command line -------------------------------------------------------------------------------
def _default_dir() -> Path:
    return Path(os.environ.get("STREAMER_KAFKA_DIR") or REPO / ".kafka" / "cluster")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/kafka", description="Apache Kafka (KRaft) on loopback ports.")
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a node or a cluster; prints bootstrap=HOST:PORT,...")
    start.add_argument("--brokers", type=int, default=1, help="number of brokers, each also a controller")
    start.add_argument("--tls", action="store_true", help="TLS listener (a CA made here: ca.pem in the folder)")
    start.add_argument("--sasl", action="store_true",
                       help=f"SASL/{MECHANISM} with ACLs; users {', '.join(USERS)} (password: NAME-secret)")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the cluster")
    for sp in (start, sub.add_parser("stop", help="stop the cluster started in --dir"),
               sub.add_parser("status", help="print the cluster's bootstrap line if it runs")):
        sp.add_argument("--dir", type=Path, default=None, help="cluster folder (default .kafka/cluster)")
    sub.add_parser("resolve", help="fetch Apache Kafka's jars into the cache (done by start when needed)")
    sub.add_parser("tools", help="print the folder of Kafka's command-line tools (kafka-topics.sh, kafka-acls.sh, "
                   "kafka-configs.sh, ...): PATH=\"$(scripts/kafka tools):$PATH\"")
    acl = sub.add_parser("acl", help="allow a principal operations on a resource (as the admin user)")
    for name in ("principal", "type", "pattern", "name", "operations"):
        acl.add_argument(name)
    acl.add_argument("--dir", type=Path, default=None)
    a = p.parse_args(argv)
    folder = (getattr(a, "dir", None) or _default_dir()).resolve()
    try:
        if a.command == "resolve":
            resolve_jars()
            return 0
        if a.command == "tools":
            print(tools_bin())
            return 0
        if a.command == "start":
            if a.brokers < 1:
                p.error("--brokers must be at least 1")
            if (folder / "cluster.json").is_file():
                old = json.loads((folder / "cluster.json").read_text())
                if any(n.get("pid") and _alive(int(n["pid"])) for n in old["nodes"].values()):
                    print(f"a cluster already runs in {folder}: scripts/kafka stop first", file=sys.stderr)
                    return 1
                shutil.rmtree(folder)  # a stopped cluster: start a fresh one
            cluster = KafkaCluster(folder, a.brokers, a.tls, a.sasl, die_with_parent=False)
            try:
                cluster.start(a.timeout)
            except BaseException:
                cluster.stop()
                raise
            print(f"[kafka] {a.brokers} broker(s), {cluster.security_protocol}; folder {folder} "
                  "(cluster.json, client.properties, logs/)", file=sys.stderr)
            print(f"bootstrap={cluster.bootstrap}", flush=True)
            return 0
        if a.command == "stop":
            KafkaCluster(folder).stop()
            return 0
        if a.command == "status":
            info = json.loads((folder / "cluster.json").read_text())
            running = any(n.get("pid") and _alive(int(n["pid"])) for n in info["nodes"].values())
            if running:
                print(f"bootstrap={info['bootstrap']}")
            return 0 if running else 1
        cluster = KafkaCluster(folder)
        cluster.info = json.loads((folder / "cluster.json").read_text())
        cluster.acl(a.principal, a.type, a.pattern, a.name, a.operations)
        return 0
    except (KafkaClusterError, FileNotFoundError) as exc:
        print(f"[kafka] {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
