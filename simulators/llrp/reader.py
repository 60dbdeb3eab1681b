"""The reader itself, sans-IO: the LLRP 1.0.1 state machine of one reader (configuration,
ROSpecs, AccessSpecs, GPIO, events and reports). Frames and messages come in; responses,
events and reports go out through the session they came on or the host's current one; the
host drives inventories and owns sockets, tasks and time (``server``, ``simulator``)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from simulators.llrp import readerconfig
from simulators.llrp.codec import (
    MESSAGES,
    TYPE_CUSTOM,
    EventType,
    Frame,
    LlrpCodecError,
    Message,
    ROSpecState,
    StartTriggerType,
    StatusCode,
    decode_frame,
    message_def,
)
from simulators.llrp.inventory import Entry, EntryKey, InventoryRun, tag_report
from simulators.llrp.personality import Personality
from simulators.llrp.readerconfig import ReaderConfig
from simulators.llrp.rospec import (
    Rejected,
    ROSpec,
    RunHandle,
    parse_rospec,
    status,
)
from simulators.llrp.tags import TagPopulation

logger = logging.getLogger(__name__)


class GpoWrite(NamedTuple):
    """One GPOWriteData the reader applied."""

    port: int
    high: bool
    utc: float
    monotonic: float


@dataclass
class SimStats:
    """Counters over the simulator's life."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    frames_suppressed: int = 0
    decode_errors: int = 0
    errors_sent: int = 0
    reports_sent: int = 0
    tags_reported: int = 0
    reports_dropped: int = 0
    keepalives_sent: int = 0
    keepalive_acks: int = 0
    events_sent: int = 0
    inventory_cycles: int = 0


class Session(Protocol):
    """One client's LLRP session, as the reader sees it (the server's connection)."""

    events_held: bool  # EventsAndReports: hold until ENABLE_EVENTS_AND_REPORTS
    held: deque[tuple[str, dict[str, Any]]]

    def send(self, name: str, params: Mapping[str, Any], msg_id: int | None = None) -> bool: ...

    def close_after_flush(self) -> None: ...

    def restart_keepalive(self) -> None: ...


class ReaderHost(Protocol):
    """What the reader needs of whoever runs it."""

    @property
    def session(self) -> Session | None:
        """The established session reports and events go to (None: no client)."""
        ...

    def start_run(self, run: InventoryRun) -> RunHandle:
        """Drive an activated ROSpec's inventory, one round every cycle."""
        ...

    def notify(self) -> None:
        """The reader's state changed (waiters re-check)."""
        ...


class ReaderModel:
    """One simulated LLRP reader's state and behaviour, without sockets or tasks."""

    def __init__(
        self,
        host: ReaderHost,
        personality: Personality,
        antennas: int,
        rng: random.Random,
        stats: SimStats,
        *,
        model_sessions: bool,
        s1_persistence_s: float,
        sensitivity_dbm: float,
        antenna_detection: bool,
        gpi_default: bool,
    ) -> None:
        self.host = host
        self.personality = personality
        self.antennas = antennas
        self.rng = rng
        self.stats = stats
        self.model_sessions = model_sessions
        self.s1_persistence_s = s1_persistence_s
        self.sensitivity_dbm = sensitivity_dbm
        # False: a reader that cannot tell an unplugged antenna: no AntennaProperties in its
        # configuration, no AntennaEvent.
        self.antenna_detection = antenna_detection
        self.gpi_default = gpi_default
        self.tags = TagPopulation()
        self.config = ReaderConfig()
        self.rospecs: dict[int, ROSpec] = {}
        self.access_specs: dict[int, dict[str, Any]] = {}
        self.accum: dict[int, dict[EntryKey, Entry]] = {}
        self.antenna_connected: dict[int, bool] = dict.fromkeys(range(1, antennas + 1), True)
        self.gpi_state: dict[int, bool] = dict.fromkeys(range(1, personality.num_gpis + 1), False)
        self.gpo: dict[int, bool] = dict.fromkeys(range(1, personality.num_gpos + 1), False)
        self.gpo_history: list[GpoWrite] = []
        self.gpo_listeners: list[Callable[[int, bool], None]] = []
        # A test's hand on the lock's wire: while this gate is closed, a SET_READER_CONFIG that
        # writes a GPO is neither applied nor answered (a slow reader); both happen once it opens.
        self.gpo_gate: asyncio.Event | None = None
        self.gpo_held = 0  # such requests waiting now
        # Fault hold_reports: RO_ACCESS_REPORTs waiting (in order) to be sent; None: not held.
        self.reports_held: list[dict[str, Any]] | None = None
        self._held: set[asyncio.Task[None]] = set()

    # -- frames in -----------------------------------------------------------------------------

    def decode(self, session: Session, frame: Frame) -> Message | None:
        """The frame's message, or None when it was answered with an error."""
        self.stats.frames_in += 1
        if frame.version != 1:
            self.stats.decode_errors += 1
            self.send_error(
                session, frame.msg_id, StatusCode.M_UnsupportedVersion, f"version {frame.version}"
            )
            return None
        try:
            return decode_frame(frame)
        except LlrpCodecError as err:
            self.stats.decode_errors += 1
            logger.info("llrp-sim: undecodable message type %d: %s", frame.type_num, err)
            response = _response_name(frame)
            if response is None or err.status == StatusCode.M_UnsupportedMessage:
                self.send_error(session, frame.msg_id, err.status, str(err))
            else:
                st = status(err.status, str(err))
                if err.param_type:
                    st["ParameterError"] = {
                        "ParameterType": err.param_type,
                        "ErrorCode": int(err.status),
                    }
                session.send(response, {"LLRPStatus": st}, frame.msg_id)
            return None

    def send_error(self, session: Session, msg_id: int, code: int, description: str) -> None:
        self.stats.errors_sent += 1
        session.send("ERROR_MESSAGE", {"LLRPStatus": status(code, description)}, msg_id)

    # -- the field and the GPIO (the harness changes them) ---------------------------------------

    def check_antenna(self, ant: int) -> None:
        if not 1 <= ant <= self.antennas:
            raise ValueError(f"antenna {ant} outside 1..{self.antennas}")

    def set_antenna_connected(self, antenna: int, connected: bool) -> None:
        self.check_antenna(antenna)
        if self.antenna_connected[antenna] == connected:
            return
        self.antenna_connected[antenna] = connected
        logger.info(
            "llrp-sim: antenna %d %s", antenna, "connected" if connected else "disconnected"
        )
        if self.antenna_detection and self.config.events.get(EventType.Antenna_Event):
            self.event({"AntennaEvent": {"EventType": int(connected), "AntennaID": antenna}})

    def set_gpi(self, port: int, high: bool) -> None:
        if port not in self.gpi_state:
            raise ValueError(f"GPI port {port} outside 1..{len(self.gpi_state)}")
        if self.gpi_state[port] == high:
            return
        self.gpi_state[port] = high
        enabled = self.config.gpi_enabled.get(port, self.gpi_default)
        if not enabled:
            return
        if self.config.events.get(EventType.GPI_Event):
            self.event({"GPIEvent": {"GPIPortNumber": port, "GPIEvent": high}})
        for rs in list(self.rospecs.values()):
            if (
                rs.state == ROSpecState.Inactive
                and rs.start_type == StartTriggerType.GPI
                and rs.start_gpi == (port, high)
            ):
                self.activate(rs)
            if rs.state == ROSpecState.Active and rs.stop_gpi and rs.stop_gpi[:2] == (port, high):
                rs.gpi_stop = True
            ai = rs.current_ai
            if rs.state == ROSpecState.Active and ai and ai.gpi and ai.gpi[:2] == (port, high):
                rs.ai_gpi_stop = True

    # -- events and reports out ------------------------------------------------------------------

    @staticmethod
    def utc_us() -> int:
        return time.time_ns() // 1000

    def event(self, data: dict[str, Any], *, force: bool = False) -> None:
        body = {"UTCTimestamp": {"Microseconds": self.utc_us()}, **data}
        self.deliver("READER_EVENT_NOTIFICATION", {"ReaderEventNotificationData": body}, force)

    def deliver(self, name: str, params: dict[str, Any], force: bool = False) -> None:
        """Send a report or event now, hold it (EventsAndReports), or drop it with no client."""
        if name == "RO_ACCESS_REPORT" and self.reports_held is not None:
            self.reports_held.append(params)  # fault hold_reports: sent once released
            return
        session = self.host.session
        if session is None:
            if name == "RO_ACCESS_REPORT":
                self.stats.reports_dropped += 1
            return
        if session.events_held and not force:
            session.held.append((name, params))
            return
        if session.send(name, params):
            self.count_sent(name, params)

    def release_reports(self) -> None:
        """Fault hold_reports ends: the held reports go out, in order."""
        held, self.reports_held = self.reports_held, None
        for params in held or ():
            self.deliver("RO_ACCESS_REPORT", params)

    def count_sent(self, name: str, params: Mapping[str, Any]) -> None:
        if name == "RO_ACCESS_REPORT":
            self.stats.reports_sent += 1
            self.stats.tags_reported += len(params["TagReportData"])
        else:
            self.stats.events_sent += 1
        self.host.notify()

    def event_enabled(self, kind: EventType) -> bool:
        return bool(self.config.events.get(kind))

    def report_spec(self, rs: ROSpec) -> Mapping[str, Any]:
        return rs.report_spec or self.config.report_spec

    def cycle_done(self) -> None:
        self.stats.inventory_cycles += 1
        self.host.notify()

    def notify(self) -> None:
        self.host.notify()

    # -- inventory runs --------------------------------------------------------------------------

    def activate(self, rs: ROSpec) -> None:
        rs.state = ROSpecState.Active
        rs.gpi_stop = False
        rs.run = InventoryRun(self, rs)
        rs.task = self.host.start_run(rs.run)
        self.host.notify()

    def halt(self, rs: ROSpec, *, report: bool = True) -> None:
        """Stop an active ROSpec: its end-of-spec report and events are out when this returns."""
        run = rs.run
        if run is None or run.finished:
            if rs.state == ROSpecState.Active:
                rs.state = ROSpecState.Inactive
            return
        if not report:
            self.accum.pop(rs.spec_id, None)
        run.stop()
        if rs.task is not None:
            rs.task.cancel()

    def halt_all(self) -> None:
        """The server stops: every running ROSpec ends (to a closing session)."""
        for rs in list(self.rospecs.values()):
            self.halt(rs)

    def power_cycle(self) -> None:
        """A reboot: ROSpecs, AccessSpecs, reports not sent and configuration are forgotten."""
        for rs in list(self.rospecs.values()):
            self.halt(rs, report=False)
        self.rospecs.clear()
        self.access_specs.clear()
        self.accum.clear()
        self.config = ReaderConfig()
        self.gpo = dict.fromkeys(self.gpo, False)

    # -- requests ----------------------------------------------------------------------------------

    def dispatch(self, session: Session, msg: Message) -> None:
        """Answer one decoded request (or not: some have no response)."""
        gate = self.gpo_gate
        if (
            gate is not None
            and not gate.is_set()
            and msg.name == "SET_READER_CONFIG"
            and msg.params.get("GPOWriteData")
        ):
            self._hold(gate, session, msg)
            return
        handler = _HANDLERS.get(msg.name)
        if handler is None:
            self.send_error(
                session, msg.msg_id, StatusCode.M_UnsupportedMessage, f"{msg.name} not supported"
            )
            return
        response = f"{msg.name}_RESPONSE"
        try:
            result = handler(self, session, msg)
        except Rejected as rej:
            logger.info("llrp-sim: %s rejected: %s", msg.name, rej)
            session.send(response, {"LLRPStatus": status(rej.code, str(rej))}, msg.msg_id)
            return
        except (KeyError, TypeError, ValueError) as err:
            # A well-formed message the reader logic did not expect: answer, never crash.
            logger.warning("llrp-sim: cannot handle %s: %r", msg.name, err)
            session.send(
                response if response in MESSAGES else "ERROR_MESSAGE",
                {"LLRPStatus": status(StatusCode.R_DeviceError, f"cannot handle: {err!r}")},
                msg.msg_id,
            )
            return
        if result is not None:
            session.send(response, {"LLRPStatus": status(), **result}, msg.msg_id)

    def _hold(self, gate: asyncio.Event, session: Session, msg: Message) -> None:
        self.gpo_held += 1

        async def when_open() -> None:
            try:
                await gate.wait()
            finally:
                self.gpo_held -= 1
            self.dispatch(session, msg)

        task = asyncio.get_running_loop().create_task(when_open(), name="llrp-sim:gpo-held")
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    # Handlers return the response's parameters (without LLRPStatus), or None for no response.

    def antenna_config(self, ant: int) -> dict[str, Any]:
        """An antenna's configuration as set, or as the factory left it."""
        return readerconfig.antenna_config(self, ant)

    def write_gpo(self, port: int, high: bool) -> None:
        self.gpo[port] = high
        self.gpo_history.append(GpoWrite(port, high, time.time(), time.monotonic()))
        logger.info("llrp-sim: GPO %d -> %s", port, "high" if high else "low")
        for cb in list(self.gpo_listeners):
            try:
                cb(port, high)
            except Exception:  # a listener's bug must not take the reader down
                logger.exception("llrp-sim: GPO listener %r failed", cb)
        self.host.notify()

    def _h_enable_events(self, session: Session, msg: Message) -> dict[str, Any] | None:
        session.events_held = False
        while session.held:
            name, params = session.held.popleft()
            if session.send(name, params):
                self.count_sent(name, params)
        return None

    def _h_keepalive_ack(self, session: Session, msg: Message) -> dict[str, Any] | None:
        self.stats.keepalive_acks += 1
        return None

    def _h_close(self, session: Session, msg: Message) -> dict[str, Any] | None:
        session.send("CLOSE_CONNECTION_RESPONSE", {"LLRPStatus": status()}, msg.msg_id)
        session.close_after_flush()
        return None

    def _h_impinj_ext(self, session: Session, msg: Message) -> dict[str, Any] | None:
        if not self.personality.impinj_extensions:
            self.send_error(
                session, msg.msg_id, StatusCode.M_UnsupportedMessage, "custom message not supported"
            )
            return None
        return {}

    def _h_custom(self, session: Session, msg: Message) -> dict[str, Any] | None:
        self.send_error(
            session, msg.msg_id, StatusCode.M_UnsupportedMessage, "custom message not supported"
        )
        return None

    def _h_get_report(self, session: Session, msg: Message) -> dict[str, Any] | None:
        """Everything accumulated so far, in one report answering the request (maybe empty)."""
        data: list[dict[str, Any]] = []
        for rs in self.rospecs.values():
            spec = rs.report_spec or self.config.report_spec
            entries = self.accum.pop(rs.spec_id, {})
            data += [tag_report(rs, spec, e, self.personality, self.rng) for e in entries.values()]
        params = {"TagReportData": data}
        if session.send("RO_ACCESS_REPORT", params, msg.msg_id):
            self.count_sent("RO_ACCESS_REPORT", params)
        return None

    # -- ROSpecs -------------------------------------------------------------------------------

    def _h_add_rospec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        raw = msg.params.get("ROSpec")
        if raw is None:
            raise Rejected(StatusCode.M_MissingParameter, "ADD_ROSPEC needs a ROSpec")
        rs = parse_rospec(raw, self)
        if rs.spec_id in self.rospecs:
            raise Rejected(StatusCode.M_FieldError, f"ROSpec {rs.spec_id} already exists")
        if len(self.rospecs) >= self.personality.max_rospecs:
            raise Rejected(
                StatusCode.M_OverflowParameter,
                f"at most {self.personality.max_rospecs} ROSpec(s); delete first",
            )
        self.rospecs[rs.spec_id] = rs
        return {}

    def _select(self, spec_id: int, *, zero_means_all: bool) -> list[ROSpec]:
        if spec_id == 0:
            if not zero_means_all:
                raise Rejected(StatusCode.M_FieldError, "ROSpecID 0 is not valid here")
            return list(self.rospecs.values())
        rs = self.rospecs.get(spec_id)
        if rs is None:
            raise Rejected(StatusCode.M_FieldError, f"no ROSpec {spec_id}")
        return [rs]

    def _h_enable_rospec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        for rs in self._select(msg.params["ROSpecID"], zero_means_all=True):
            if rs.state == ROSpecState.Disabled:
                rs.state = ROSpecState.Inactive
                if rs.start_type == StartTriggerType.Immediate:
                    self.activate(rs)
        self.host.notify()
        return {}

    def _h_start_rospec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        (rs,) = self._select(msg.params["ROSpecID"], zero_means_all=False)
        if rs.state != ROSpecState.Inactive:
            raise Rejected(
                StatusCode.M_FieldError, f"ROSpec {rs.spec_id} is {rs.state.name}, not Inactive"
            )
        self.activate(rs)
        return {}

    def _h_stop_rospec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        (rs,) = self._select(msg.params["ROSpecID"], zero_means_all=False)
        if rs.state != ROSpecState.Active:
            raise Rejected(StatusCode.M_FieldError, f"ROSpec {rs.spec_id} is not Active")
        self.halt(rs)
        return {}

    def _h_disable_rospec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        for rs in self._select(msg.params["ROSpecID"], zero_means_all=True):
            self.halt(rs)
            rs.state = ROSpecState.Disabled
        self.host.notify()
        return {}

    def _h_delete_rospec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        for rs in self._select(msg.params["ROSpecID"], zero_means_all=True):
            self.halt(rs)
            self.rospecs.pop(rs.spec_id, None)
            self.accum.pop(rs.spec_id, None)
        self.host.notify()
        return {}

    def _h_get_rospecs(self, session: Session, msg: Message) -> dict[str, Any] | None:
        return {
            "ROSpec": [{**rs.raw, "CurrentState": int(rs.state)} for rs in self.rospecs.values()]
        }

    # -- AccessSpecs (stored and reported; no tag memory operations) ---------------------------

    def _h_add_accessspec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        spec = msg.params.get("AccessSpec")
        if spec is None:
            raise Rejected(StatusCode.M_MissingParameter, "ADD_ACCESSSPEC needs an AccessSpec")
        sid = spec["AccessSpecID"]
        if sid == 0 or sid in self.access_specs:
            raise Rejected(StatusCode.M_FieldError, f"AccessSpecID {sid} invalid or in use")
        if len(self.access_specs) >= self.personality.max_access_specs:
            raise Rejected(StatusCode.M_OverflowParameter, "too many AccessSpecs")
        self.access_specs[sid] = dict(spec)
        return {}

    def _access_ids(self, sid: int) -> list[int]:
        if sid == 0:
            return list(self.access_specs)
        if sid not in self.access_specs:
            raise Rejected(StatusCode.M_FieldError, f"no AccessSpec {sid}")
        return [sid]

    def _h_delete_accessspec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        for sid in self._access_ids(msg.params["AccessSpecID"]):
            del self.access_specs[sid]
        return {}

    def _h_enable_accessspec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        for sid in self._access_ids(msg.params["AccessSpecID"]):
            self.access_specs[sid]["CurrentState"] = True
        return {}

    def _h_disable_accessspec(self, session: Session, msg: Message) -> dict[str, Any] | None:
        for sid in self._access_ids(msg.params["AccessSpecID"]):
            self.access_specs[sid]["CurrentState"] = False
        return {}

    def _h_get_accessspecs(self, session: Session, msg: Message) -> dict[str, Any] | None:
        return {"AccessSpec": list(self.access_specs.values())}


def _response_name(frame: Frame) -> str | None:
    md = message_def(frame.type_num)
    if md is None or frame.type_num == TYPE_CUSTOM:
        return None
    name = f"{md.name}_RESPONSE"
    return name if name in MESSAGES else None


_Handler = Callable[[ReaderModel, Session, Message], dict[str, Any] | None]
_HANDLERS: dict[str, _Handler] = {
    "GET_READER_CAPABILITIES": readerconfig.get_capabilities,
    "GET_READER_CONFIG": readerconfig.get_config,
    "SET_READER_CONFIG": readerconfig.set_config,
    "ENABLE_EVENTS_AND_REPORTS": ReaderModel._h_enable_events,
    "KEEPALIVE_ACK": ReaderModel._h_keepalive_ack,
    "CLOSE_CONNECTION": ReaderModel._h_close,
    "IMPINJ_ENABLE_EXTENSIONS": ReaderModel._h_impinj_ext,
    "CUSTOM_MESSAGE": ReaderModel._h_custom,
    "GET_REPORT": ReaderModel._h_get_report,
    "ADD_ROSPEC": ReaderModel._h_add_rospec,
    "ENABLE_ROSPEC": ReaderModel._h_enable_rospec,
    "START_ROSPEC": ReaderModel._h_start_rospec,
    "STOP_ROSPEC": ReaderModel._h_stop_rospec,
    "DISABLE_ROSPEC": ReaderModel._h_disable_rospec,
    "DELETE_ROSPEC": ReaderModel._h_delete_rospec,
    "GET_ROSPECS": ReaderModel._h_get_rospecs,
    "ADD_ACCESSSPEC": ReaderModel._h_add_accessspec,
    "DELETE_ACCESSSPEC": ReaderModel._h_delete_accessspec,
    "ENABLE_ACCESSSPEC": ReaderModel._h_enable_accessspec,
    "DISABLE_ACCESSSPEC": ReaderModel._h_disable_accessspec,
    "GET_ACCESSSPECS": ReaderModel._h_get_accessspecs,
}
