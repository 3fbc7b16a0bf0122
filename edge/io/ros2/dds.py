"""The DDS side of the bridge: the binding's lazy import, the participant, its generated configuration, QoS.

One ``Ros2Node`` per process holds a Cyclone DDS domain made from a configuration this module generates
(``cyclone_config_xml``): the network interface from the config, multicast off unless asked for, and
discovery through the listed unicast peers. Tests bind everything to 127.0.0.1.

QoS is stated in full on every reader and writer, because DDS implementations disagree on defaults (a Fast
DDS reader defaults to best-effort, a ROS 2 node does not). The profiles are the ones ROS 2 users know
(rmw_qos_profile_sensor_data, rmw_qos_profile_default, and the transient-local "latched" status).
"""

from __future__ import annotations

import enum
import importlib
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from edge.errors import ConfigError, EdgeError
from edge.validation import check_bool, check_range, check_sequence, check_text

logger = logging.getLogger(__name__)

_INSTALL_HINT = ("install the ROS 2 extra: pip install 'vla-edge[ros2]' (on a Jetson, where PyPI has no "
                 "aarch64 wheel, see docs/ros2.md: the binding builds against the Cyclone DDS C library)")
_TOPIC_RE = re.compile(r"^/?[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


class Ros2Error(EdgeError):
    """The ROS 2 bridge could not start (missing binding, bad DDS config) or a topic misbehaved."""


def require_cyclonedds() -> Any:
    """Import the Cyclone DDS binding, or raise Ros2Error naming the extra to install."""
    try:
        return importlib.import_module("cyclonedds")
    except ImportError as exc:
        raise Ros2Error(f"the ROS 2 bridge needs the cyclonedds package ({exc}); {_INSTALL_HINT}") from exc


def dds_topic_name(ros_topic: str) -> str:
    """ROS 2 topic ``/camera/image_raw`` (or ``camera/image_raw``) is DDS topic ``rt/camera/image_raw``."""
    return "rt/" + ros_topic.lstrip("/")


def check_topic(key: str, value: Any) -> str:
    text = check_text(key, value, "a ROS 2 topic name such as /camera/image_raw")
    if not _TOPIC_RE.match(text):
        raise ConfigError(f"{key} = {value!r} is not a ROS 2 topic name: use letters, digits and '_' in "
                          "'/'-separated parts, each starting with a letter (e.g. /camera/image_raw)")
    return text


def _check_ipv4(key: str, value: Any) -> str:
    text = check_text(key, value, "an IPv4 address such as 127.0.0.1")
    if not _IPV4_RE.match(text) or any(int(part) > 255 for part in text.split(".")):
        raise ConfigError(f"{key} = {value!r} is not an IPv4 address (e.g. 127.0.0.1 or 192.168.1.20)")
    return text


@dataclass(frozen=True)
class Ros2Config:
    """Which DDS domain and network the bridge joins."""

    domain_id: int = 0  # ROS_DOMAIN_ID of the robot's ROS 2 graph
    interface_address: str = "127.0.0.1"  # the network interface DDS binds to (its IPv4 address)
    peers: tuple[str, ...] = ("127.0.0.1",)  # unicast discovery peers (the robot's ROS 2 hosts)
    allow_multicast: bool = False  # SPDP multicast discovery; loopback has none, so off by default
    max_auto_participant_index: int = 32  # with unicast peers: how many participants per host are probed

    def __post_init__(self) -> None:
        # 232 is the largest domain id whose RTPS ports fit in 16 bits (DDSI-RTPS 2.5, 9.6.1.1 port mapping).
        check_range("ros2.domain_id", self.domain_id, 0, 232, integer=True)
        _check_ipv4("ros2.interface_address", self.interface_address)
        object.__setattr__(self, "peers", check_sequence("ros2.peers", self.peers, _check_ipv4,
                                                         noun="IPv4 addresses"))
        check_bool("ros2.allow_multicast", self.allow_multicast)
        check_range("ros2.max_auto_participant_index", self.max_auto_participant_index, 1, 120, integer=True)


def cyclone_config_xml(config: Ros2Config) -> str:
    """The Cyclone DDS configuration for ``config``: one interface, unicast peers, multicast as configured."""
    peers = "".join(f"<Peer address={quoteattr(p)}/>" for p in config.peers)
    multicast = "true" if config.allow_multicast else "false"
    return ("<CycloneDDS><Domain id=\"any\">"
            f"<General><Interfaces><NetworkInterface address={quoteattr(config.interface_address)}/>"
            f"</Interfaces><AllowMulticast>{multicast}</AllowMulticast></General>"
            f"<Discovery><Peers>{peers}</Peers><ParticipantIndex>auto</ParticipantIndex>"
            f"<MaxAutoParticipantIndex>{config.max_auto_participant_index}</MaxAutoParticipantIndex>"
            "</Discovery></Domain></CycloneDDS>")


class QosProfile(str, enum.Enum):
    SENSOR = "sensor"  # camera frames, joint states: best effort, keep last 1, volatile
    COMMAND = "command"  # velocity / trajectory commands and the e-stop: reliable, keep last 1, volatile
    STATUS = "status"  # /diagnostics and the mode topic: reliable, keep last 1, transient local
    DEFAULT = "default"  # ROS 2's default: reliable, keep last 10, volatile (instructions)


def make_qos(profile: QosProfile) -> Any:
    """The full QoS of ``profile`` (every policy that differs between DDS implementations' defaults)."""
    from cyclonedds.core import Policy
    from cyclonedds.qos import Qos
    from cyclonedds.util import duration

    # XCDR1 only: ROS 2's middlewares write and accept plain CDR; an XCDR2 writer would not match them.
    representation = Policy.DataRepresentation(use_cdrv0_representation=True)
    reliable = Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100))
    if profile is QosProfile.SENSOR:
        return Qos(Policy.Reliability.BestEffort, Policy.Durability.Volatile, Policy.History.KeepLast(1),
                   representation)
    if profile is QosProfile.COMMAND:
        return Qos(reliable, Policy.Durability.Volatile, Policy.History.KeepLast(1), representation)
    if profile is QosProfile.STATUS:
        return Qos(reliable, Policy.Durability.TransientLocal, Policy.History.KeepLast(1), representation)
    return Qos(reliable, Policy.Durability.Volatile, Policy.History.KeepLast(10), representation)


# Cyclone DDS holds one domain per process and id: a second Domain(id, config) for an id already open
# raises PRECONDITION_NOT_MET (seen with cyclonedds 11.0.1). Nodes of one process on one domain share
# it, and must agree on its configuration.
_DOMAINS: dict[int, list[Any]] = {}  # domain id -> [config xml, Domain, nodes holding it]
_DOMAINS_LOCK = threading.Lock()


def _acquire_domain(config: Ros2Config) -> Any:
    from cyclonedds.domain import Domain

    xml = cyclone_config_xml(config)
    with _DOMAINS_LOCK:
        entry = _DOMAINS.get(config.domain_id)
        if entry is None:
            entry = _DOMAINS[config.domain_id] = [xml, Domain(config.domain_id, xml), 0]
        elif entry[0] != xml:
            raise Ros2Error(f"DDS domain {config.domain_id} is already open in this process with another "
                            "network configuration; give every ros2 node of one process the same "
                            "interface_address, peers and allow_multicast")
        entry[2] += 1
        return entry[1]


def _release_domain(domain_id: int) -> None:
    with _DOMAINS_LOCK:
        entry = _DOMAINS.get(domain_id)
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0:
                del _DOMAINS[domain_id]


class Ros2Node:
    """One DDS participant on the configured domain; makes the readers and writers of the roles."""

    def __init__(self, config: Ros2Config) -> None:
        self.config = config
        self._domain: Any = None
        self._participant: Any = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        dds = require_cyclonedds()
        from cyclonedds.domain import DomainParticipant

        if self._participant is not None:
            raise Ros2Error("the ROS 2 node is already connected")
        try:
            self._domain = _acquire_domain(self.config)
            self._participant = DomainParticipant(self.config.domain_id)
        except dds.core.DDSException as exc:
            if self._domain is not None:
                _release_domain(self.config.domain_id)
            self._domain = None
            raise Ros2Error(f"could not join DDS domain {self.config.domain_id} on interface "
                            f"{self.config.interface_address} ({exc}); check ros2.interface_address is an "
                            "address of this machine (`ip -4 addr`) and ros2.domain_id") from exc
        logger.info("ROS 2 node on DDS domain %d, interface %s, peers %s", self.config.domain_id,
                    self.config.interface_address, ", ".join(self.config.peers))

    @property
    def is_connected(self) -> bool:
        return self._participant is not None

    @property
    def participant(self) -> Any:
        """The binding's DomainParticipant (for wait sets); Ros2Error before connect()."""
        if self._participant is None:
            raise Ros2Error("the ROS 2 node is not connected; call connect() first")
        return self._participant

    def disconnect(self) -> None:
        # The binding deletes entities when they are garbage collected: dropping the references deletes
        # the participant, and the domain goes when its last node in this process has let go of it.
        if self._participant is None:
            return
        self._participant = None
        self._domain = None
        _release_domain(self.config.domain_id)

    def __enter__(self) -> Ros2Node:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    def _topic(self, ros_topic: str, msg_type: type) -> Any:
        from cyclonedds.topic import Topic

        if self._participant is None:
            raise Ros2Error(f"topic {ros_topic}: the ROS 2 node is not connected; call connect() first")
        return Topic(self._participant, dds_topic_name(ros_topic), msg_type)

    def writer(self, ros_topic: str, msg_type: type, profile: QosProfile) -> Any:
        from cyclonedds.pub import DataWriter

        with self._lock:
            return DataWriter(self._participant, self._topic(ros_topic, msg_type), qos=make_qos(profile))

    def reader(self, ros_topic: str, msg_type: type, profile: QosProfile) -> Any:
        from cyclonedds.sub import DataReader

        with self._lock:
            return DataReader(self._participant, self._topic(ros_topic, msg_type), qos=make_qos(profile))
