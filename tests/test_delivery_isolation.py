"""agent/mqtt/isolate.py: which outcomes start an isolation, count a strike, and end it.

The real-broker proof is tests/test_delivery_poison.py; these pin the rules it relies on,
including the ones a poison on mosquitto does not reach (a broker refusing every event, a link
cut twice).
"""

from __future__ import annotations

from agent.cli.control_cmd import broker_line
from agent.mqtt.isolate import CLEAR_AFTER, Isolation


def _isolating(*suspects: int) -> Isolation:
    iso = Isolation()
    iso.session_ended({*suspects, 99}, True, "closed")
    iso.session_ended(set(suspects), True, "closed")
    assert iso.active
    assert iso.suspects == set(suspects)
    return iso


def test_a_row_lost_with_two_connections_in_a_row_starts_an_isolation() -> None:
    iso = Isolation()
    assert iso.window(20) == 20
    iso.session_ended({5, 6, 7}, True, "connection closed by the broker")
    assert not iso.active, "one lost connection is an ordinary outage"
    iso.session_ended({6, 8}, True, "connection closed by the broker")
    assert iso.active
    assert iso.suspects == {6}
    assert iso.window(20) == 1


def test_other_rows_lost_each_time_or_a_connection_we_ended_start_nothing() -> None:
    iso = Isolation()
    iso.session_ended({1, 2}, True, "link cut")
    iso.session_ended({3, 4}, True, "link cut")  # the earlier ones went through meanwhile
    iso.session_ended({3, 4}, False, "stopping")  # ours: says nothing about the broker
    iso.session_ended({3, 4}, True, "link cut")
    assert not iso.active
    iso.session_ended(set(), True, "idle connection closed")
    iso.session_ended({3}, True, "link cut")
    assert not iso.active, "a connection in between lost nothing: not two in a row"


def test_a_strike_counts_only_once_another_event_went_through() -> None:
    iso = _isolating(6)
    iso.session_ended({6}, True, "connection closed by the broker")
    assert iso.set_aside == {6}, "struck: not sent again until another event is confirmed"
    assert iso.strikes == 0
    assert iso.confirmed(7) == [
        (6, "the broker ended the connection with only this event in flight: "
            "connection closed by the broker"),
    ]  # fmt: skip
    assert iso.strikes == 1
    assert not iso.set_aside
    assert iso.active, "still a suspect: it goes alone again"


def test_a_broker_refusing_everything_strikes_nothing() -> None:
    iso = _isolating(1, 2, 3)
    for seq in (1, 2, 3):
        iso.session_ended({seq}, True, "not delivered back")
    assert set(iso.set_aside) == {1, 2, 3}
    assert iso.nothing_else_to_send(), "released uncounted"
    assert not iso.set_aside
    assert iso.strikes == 0
    assert not iso.nothing_else_to_send()


def test_a_struck_event_that_goes_through_later_is_no_strike() -> None:
    iso = _isolating(6)
    iso.session_ended({6}, True, "link cut")
    iso.nothing_else_to_send()
    assert iso.confirmed(6) == []
    assert iso.strikes == 0
    assert not iso.active, "the only suspect went through: full window again"


def test_the_isolation_ends_when_its_suspects_are_dead_lettered() -> None:
    iso = _isolating(6, 7)
    iso.confirmed(7)
    assert iso.active
    iso.dead_lettered(6)
    assert not iso.active
    assert iso.window(20) == 20


def test_the_isolation_ends_after_many_clean_confirmations_anyway() -> None:
    iso = _isolating(6)  # a suspect that left the outbox some other way
    for seq in range(100, 100 + CLEAR_AFTER - 1):
        iso.confirmed(seq)
    assert iso.active
    iso.confirmed(1000)
    assert not iso.active


def test_status_says_the_publisher_isolates() -> None:
    broker = {"state": "connected", "acked": 7, "reconnects": 3, "isolating": True}
    line = broker_line(broker, {"depth": 4})
    assert line.startswith("connected, 7 acked, 3 reconnects, 4 event(s) waiting; ISOLATING")
    assert "ISOLATING" not in broker_line({**broker, "isolating": False}, {"depth": 4})
