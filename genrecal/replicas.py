"""Several teacher replicas behind one client: ``--teacher-addr HOST1:P1,HOST2:P2`` (or a name resolving to several).

:class:`ReplicatedTeacher` satisfies the same teacher protocol as :class:`genrecal.client.TeacherClient`, so the
trainer's :class:`~genrecal.resilient_teacher.ResilientTeacher` wraps it unchanged.

- **Encode** goes to the healthy replica with the fewest requests outstanding from this client (ties rotate, so
  lockstep callers spread evenly).
- **Score / Release** go to the replica that issued the handle: the client hands out handles of the form
  ``"{replica}/{instance_id}/{server handle}"``, where ``instance_id`` is what that replica's Info reported. A
  score whose features come from several replicas is split per replica and the parts added up exactly (each part
  is normalised by the whole call's token count).
- **A replica that dies** (UNAVAILABLE once its client's short retries are spent) is dropped: Encode moves to the
  others at once, and a Score for its handles raises :class:`~genrecal.client.HandleLost`, on which the trainer's
  wrapper re-encodes those samples (now on a live replica) and retries — the step is neither lost nor repeated.
- **A replica that comes back** is probed (health, then Info) at most every ``probe_interval_s`` and used again;
  it must report the same teacher identity as the others. Its new instance id makes any handle from its previous
  life a ``HandleLost`` without a round trip.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc
import torch

from genrecal.client import HandleLost, TeacherClient, TeacherError, TeacherUnavailable
from genrecal.head_scoring import HeadScore
from genrecal.sample import Sample
from genrecal.teacher import TeacherFeatures
from genrecal.wire import WireTraffic

logger = logging.getLogger(__name__)


def resolve_addresses(spec: str) -> list[str]:
    """``"h1:p1,h2:p2"`` -> addresses; a host name resolving to several IPs gives one address per IP."""
    addresses = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"teacher address must be HOST:PORT, got {part!r} (in {spec!r})")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror:
            addresses.append(part)  # unresolvable now: kept, and treated as a dead replica until it answers
            continue
        ips = list(dict.fromkeys(info[4][0] for info in infos if info[0] == socket.AF_INET)) or [host]
        addresses.extend(part if len(ips) == 1 else f"{ip}:{port}" for ip in ips)
    addresses = list(dict.fromkeys(addresses))
    if not addresses:
        raise ValueError(f"no teacher address in {spec!r}")
    return addresses


@dataclass(eq=False)  # hashed by identity: used as a dict key
class _Replica:
    index: int
    client: TeacherClient
    instance_id: str | None = None  # None while dead
    outstanding: int = 0
    dead_since: float = 0.0

    @property
    def alive(self) -> bool:
        return self.instance_id is not None


class ReplicatedTeacher:
    """A teacher client over several replicas of one teacher (see the module docstring)."""

    def __init__(self, addresses: Sequence[str], *, probe_interval_s: float = 5.0, **client_kwargs):
        if not addresses:
            raise ValueError("ReplicatedTeacher needs at least one address")
        self.traffic = client_kwargs.pop("traffic", None) or WireTraffic()  # every replica's calls, together
        self._client_kwargs = {**client_kwargs, "traffic": self.traffic}
        self.replicas = [_Replica(i, TeacherClient(a, **self._client_kwargs)) for i, a in enumerate(addresses)]
        self.probe_interval_s = probe_interval_s
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._identity: dict | None = None
        self.failovers = 0  # replicas dropped

    # ---- the teacher protocol --------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return ",".join(r.client.address for r in self.replicas)

    @property
    def expect_revision(self) -> str | None:
        return self.replicas[0].client.expect_revision

    @expect_revision.setter
    def expect_revision(self, revision: str | None) -> None:
        for r in self.replicas:
            r.client.expect_revision = revision

    def wait_until_serving(self, timeout_s: float = 300.0) -> None:
        """Block until at least one replica serves (and agrees with the others' identity)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for r in self.replicas:
                if not r.alive:
                    self._probe(r, force=True)
            if any(r.alive for r in self.replicas):
                return
            if time.monotonic() >= deadline:
                raise TeacherUnavailable(self.address, "health check", grpc.StatusCode.UNAVAILABLE,
                                         f"no replica SERVING after {timeout_s:.0f} s")
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))

    def identity(self) -> dict:
        if self._identity is None:
            self.wait_until_serving(self.replicas[0].client.timeout_s)
        return dict(self._identity)

    @property
    def hidden_size(self) -> int:
        return int(self.identity()["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.identity()["vocab_size"])

    def info(self, refresh: bool = False):
        return self._pick().client.info(refresh)

    def encode(self, samples: Sequence[Sample], **kwargs) -> list[TeacherFeatures]:
        """``TeacherClient.encode`` (same keyword arguments) on the least busy live replica."""
        while True:
            replica = self._pick()
            with self._lock:
                replica.outstanding += 1
            try:
                features = replica.client.encode(samples, **kwargs)
            except TeacherUnavailable as exc:
                self._drop(replica, exc)
                continue  # another replica, if any is left (else _pick raises)
            finally:
                with self._lock:
                    replica.outstanding -= 1
            instance = replica.instance_id
            return [replace(f, handle=f"{replica.index}/{instance}/{f.handle}") for f in features]

    def score(self, features: Sequence[TeacherFeatures], answer_outputs: Sequence[torch.Tensor], *,
              normalizer: float | None = None, ce_weight: float = 1.0, kl_weight: float = 1.0,
              release: bool = False) -> tuple[HeadScore, list[torch.Tensor]]:
        return self.score_paths(features, {"L1": answer_outputs}, normalizer=normalizer, ce_weight=ce_weight,
                                kl_weight=kl_weight, release=release)["L1"]

    def score_paths(self, features: Sequence[TeacherFeatures], outputs_by_path, *, normalizer: float | None = None,
                    ce_weight: float = 1.0, kl_weight: float = 1.0, release: bool = False
                    ) -> dict[str, tuple[HeadScore, list[torch.Tensor]]]:
        """Several Recalibrator paths of the same samples in ONE Score call per replica that issued their handles
        (one in all when a replica encoded the whole step); the parts of several replicas add up exactly."""
        for path, outputs in outputs_by_path.items():
            if len(features) != len(outputs):
                raise ValueError(f"path {path!r}: {len(features)} features but {len(outputs)} answer outputs")
        groups = self._by_replica(features, "Score")
        if len(groups) > 1 and normalizer is None:  # parts must share one normaliser to add up
            normalizer = float(sum(f.num_answer_tokens for f in features))
        grads = {path: [None] * len(features) for path in outputs_by_path}
        totals = dict.fromkeys(outputs_by_path, (0.0, 0.0, 0))  # path -> (ce, kl, tokens), summed over replicas
        for replica, (positions, raw) in groups.items():
            try:
                parts = replica.client.score_paths(
                    raw, {path: [outputs[i] for i in positions] for path, outputs in outputs_by_path.items()},
                    normalizer=normalizer, ce_weight=ce_weight, kl_weight=kl_weight, release=release)
            except TeacherUnavailable as exc:
                self._drop(replica, exc)
                raise HandleLost(replica.client.address, "Score", grpc.StatusCode.NOT_FOUND,
                                 f"replica {replica.client.address} is gone with the states of its handles") from exc
            for path, (score, part) in parts.items():
                ce, kl, tokens = totals[path]
                totals[path] = (ce + score.ce, kl + score.kl, tokens + score.num_tokens)
                for i, grad in zip(positions, part, strict=True):
                    grads[path][i] = grad
        results = {}
        for path, (ce, kl, num_tokens) in totals.items():
            path_grads = grads[path]
            results[path] = (HeadScore(ce=torch.as_tensor(ce), kl=torch.as_tensor(kl),
                                       grad_inputs=torch.cat(path_grads) if path_grads else None,
                                       num_tokens=num_tokens), path_grads)
        return results

    def release(self, features: Sequence[TeacherFeatures]) -> int:
        released = 0
        for replica, (_, raw) in self._by_replica(features, "Release", lost_ok=True).items():
            try:
                released += replica.client.release(raw)
            except TeacherUnavailable as exc:
                self._drop(replica, exc)
        return released

    def close(self) -> None:
        for r in self.replicas:
            r.client.close()

    def __enter__(self) -> ReplicatedTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- replica bookkeeping ---------------------------------------------------------------------------------
    def _pick(self) -> _Replica:
        """The live replica with the fewest outstanding requests (ties rotate); dead ones are probed first."""
        for r in self.replicas:
            if not r.alive:
                self._probe(r)
        with self._lock:
            alive = [r for r in self.replicas if r.alive]
            if not alive:
                raise TeacherUnavailable(self.address, "Encode", grpc.StatusCode.UNAVAILABLE,
                                         "every teacher replica is unavailable")
            turn = next(self._turn)
            rotated = alive[turn % len(alive):] + alive[: turn % len(alive)]
            return min(rotated, key=lambda r: r.outstanding)

    def _probe(self, replica: _Replica, *, force: bool = False) -> None:
        """A dead (or never contacted) replica: health, then Info; alive again if it is the same teacher."""
        if not force and replica.dead_since and time.monotonic() - replica.dead_since < self.probe_interval_s:
            return
        if replica.dead_since:  # a fresh channel: gRPC backs off reconnecting a failed one for up to minutes
            old = replica.client
            replica.client = TeacherClient(old.address, **self._client_kwargs)
            replica.client.expect_revision = old.expect_revision
            old.close()
        try:
            replica.client.wait_until_serving(timeout_s=min(2.0, replica.client.timeout_s))
            info = replica.client.info(refresh=True)
            identity = replica.client.identity()
        except TeacherError as exc:
            replica.dead_since = time.monotonic()
            logger.debug("teacher replica %s still unavailable: %s", replica.client.address, exc)
            return
        with self._lock:
            if self._identity is None:
                self._identity = identity
            elif identity != self._identity:
                replica.dead_since = time.monotonic()
                logger.error("teacher replica %s serves another teacher (%s, revision %s); not using it",
                             replica.client.address, identity.get("model_name"), identity.get("revision"))
                return
            came_back = replica.dead_since > 0
            replica.instance_id, replica.dead_since = info.instance_id or "-", 0.0
        if came_back:
            logger.warning("teacher replica %s is serving again (instance %s); using it", replica.client.address,
                           replica.instance_id)

    def _drop(self, replica: _Replica, exc: TeacherError) -> None:
        with self._lock:
            if not replica.alive:
                return
            replica.instance_id, replica.dead_since = None, time.monotonic()
            self.failovers += 1
        logger.warning("teacher replica %s is unavailable (%s); dropping it, %d replica(s) left",
                       replica.client.address, exc.details, sum(r.alive for r in self.replicas))

    def _by_replica(self, features: Sequence[TeacherFeatures], method: str, *, lost_ok: bool = False
                    ) -> dict[_Replica, tuple[list[int], list[TeacherFeatures]]]:
        """Features by the replica that issued their handles, with the server's own handles put back."""
        groups: dict[int, tuple[list[int], list[TeacherFeatures]]] = {}
        for position, f in enumerate(features):
            index, instance, raw = _parse_handle(f)
            replica = self.replicas[index] if index < len(self.replicas) else None
            if replica is None or replica.instance_id != instance:
                if lost_ok:
                    continue
                address = replica.client.address if replica else "?"
                state = "is unavailable" if replica is not None and not replica.alive else "was restarted"
                raise HandleLost(address, method, grpc.StatusCode.NOT_FOUND,
                                 f"sample {f.sample_id!r}: the replica that encoded it ({address}) {state}; "
                                 "its handle is gone")
            positions, raws = groups.setdefault(index, ([], []))
            positions.append(position)
            raws.append(replace(f, handle=raw))
        return {self.replicas[index]: group for index, group in groups.items()}


def _parse_handle(feature: TeacherFeatures) -> tuple[int, str, str]:
    parts = (feature.handle or "").split("/", 2)
    if len(parts) != 3 or not parts[0].isdigit():
        raise ValueError(f"sample {feature.sample_id!r}: handle {feature.handle!r} was not issued by this "
                         "ReplicatedTeacher; encode the sample with it first")
    return int(parts[0]), parts[1], parts[2]


def connect(addr: str, **client_kwargs) -> TeacherClient | ReplicatedTeacher:
    """One address: a plain client; several (or a name resolving to several): a ``ReplicatedTeacher``."""
    addresses = resolve_addresses(addr)
    if len(addresses) == 1 and "," not in addr:
        return TeacherClient(addr, **client_kwargs)
    return ReplicatedTeacher(addresses, **client_kwargs)
