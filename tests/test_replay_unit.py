"""The pure parts of `replay` and `rejects`: window bounds, ack-subject sequences,
time and subject arguments, the counts table and the progress line."""

from __future__ import annotations

import datetime as dt

import pytest

from notip_trio.js.delivery import JsMsg
from notip_trio.js.window import seqs_of
from notip_trio.offline import parse_subject_filter, parse_when
from notip_trio.rejects import format_counts
from notip_trio.replay import Tally, Window, cut, progress_line

NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def _msg(seq: int, ts_ns: int = 0, cseq: int | None = None) -> JsMsg:
    c = seq if cseq is None else cseq
    return JsMsg("telemetry.data.t.g", b"{}", f"$JS.ACK.TELEMETRY.eph.1.{seq}.{c}.{ts_ns}.0")


def test_seqs_of_both_ack_subject_forms() -> None:
    assert seqs_of("$JS.ACK.TELEMETRY.eph.1.42.7.1700000000000000000.3") == (42, 7)
    assert seqs_of("$JS.ACK.dom.acc.TELEMETRY.eph.1.42.7.1700000000000000000.3.tok") == (42, 7)
    assert seqs_of("_INBOX.abc") is None


def test_cut_ends_at_the_last_sequence_inclusive() -> None:
    msgs = [_msg(s) for s in (4, 5, 6, 7)]
    assert cut(msgs, end_seq=5, until_ns=None) == (msgs[:2], True)
    assert cut(msgs, end_seq=7, until_ns=None) == (msgs, True)
    assert cut(msgs, end_seq=9, until_ns=None) == (msgs, False)
    # A filter skips sequences: the first one past the end ends the window.
    assert cut([_msg(3), _msg(9)], end_seq=5, until_ns=None) == ([_msg(3)], True)


def test_cut_ends_before_the_first_message_at_until() -> None:
    msgs = [_msg(1, 100), _msg(2, 199), _msg(3, 200), _msg(4, 150)]
    assert cut(msgs, end_seq=10, until_ns=200) == (msgs[:2], True)
    assert cut(msgs[:2], end_seq=10, until_ns=200) == (msgs[:2], False)


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("2026-05-01T10:00:00Z", dt.datetime(2026, 5, 1, 10, tzinfo=dt.UTC)),
        ("2026-05-01T12:30+02:00", dt.datetime(2026, 5, 1, 10, 30, tzinfo=dt.UTC)),
        ("90m", NOW - dt.timedelta(minutes=90)),
        ("2h", NOW - dt.timedelta(hours=2)),
        ("1d", NOW - dt.timedelta(days=1)),
        ("30s", NOW - dt.timedelta(seconds=30)),
    ],
)
def test_parse_when(text: str, when: dt.datetime) -> None:
    assert parse_when(text, NOW) == when


@pytest.mark.parametrize("text", ["2026-05-01T10:00:00", "yesterday", "2 h", "-1h", ""])
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"time zone|not a time"):
        parse_when(text, NOW)


@pytest.mark.parametrize(
    "text",
    ["telemetry.data.t1.>", "telemetry.data.*.gw-1", "telemetry.data.t1.gw-1", "telemetry.data.>"],
)
def test_subject_filters_accepted(text: str) -> None:
    assert parse_subject_filter(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "alert.>",
        "telemetry.>",
        "telemetry.data.t1.>.x",
        "telemetry.data.>.gw",
        "telemetry.data.t 1.>",
    ],
)
def test_subject_filters_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a telemetry subject filter"):
        parse_subject_filter(text)


def test_window_problems() -> None:
    assert Window(from_seq=1).problem() is None
    assert Window(since=NOW, until=NOW + dt.timedelta(1)).problem() is None
    assert Window().problem() == "give exactly one of --from-seq and --since"
    assert Window(from_seq=2, to_seq=1).problem() == "--to-seq must not be below --from-seq"
    assert Window(since=NOW, until=NOW).problem() == "--until must be after --since"


def test_format_counts() -> None:
    day1, day2 = dt.date(2026, 5, 1), dt.date(2026, 5, 2)
    text = format_counts(
        [(day1, "malformed_json", 3), (day2, "malformed_json", 2), (day2, "oversized", 1)]
    )
    assert [line.split() for line in text.splitlines()] == [
        ["day", "reason", "count"],
        ["2026-05-01", "malformed_json", "3"],
        ["2026-05-02", "malformed_json", "2"],
        ["2026-05-02", "oversized", "1"],
        ["all", "days", "malformed_json", "5"],
        ["all", "days", "oversized", "1"],
        ["total", "6"],
    ]
    assert format_counts([]).splitlines()[-1].split() == ["total", "0"]


def test_progress_line_names_position_rate_counts_and_time_left() -> None:
    tally = Tally(messages=500, new=400, already_stored=90, rejected=10, first_seq=1, last_seq=500)
    tally.end_seq = 1500
    tally.started -= 10.0  # 500 sequences in 10 s: 1000 left take 20 s
    line = progress_line(tally)
    assert line.startswith("seq 500/1500  ")
    assert "new 400  already stored 90  rejected 10  left ~20s" in line
