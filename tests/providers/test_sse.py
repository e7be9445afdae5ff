"""The Server-Sent Events parser, rule by rule of the WHATWG "Interpreting an event stream" algorithm."""

from __future__ import annotations

import pytest

from pocketllm.kit.sse import SseDecoder, SseEvent, SseEventTooLarge


def decode_all(*chunks: str) -> list[SseEvent]:
    decoder = SseDecoder()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    decoder.end()
    return events


def datas(events: list[SseEvent]) -> list[str]:
    return [event.data for event in events]


# -- line endings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line_break", ["\n", "\r\n", "\r"])
def test_line_break_kinds(line_break: str) -> None:
    stream = f"data: a{line_break}data: b{line_break}{line_break}data: c{line_break}{line_break}"

    events = decode_all(stream)

    assert datas(events) == ["a\nb", "c"]


def test_mixed_line_breaks_in_one_stream() -> None:
    events = decode_all("data: a\r\ndata: b\rdata: c\n\r\n")

    assert datas(events) == ["a\nb\nc"]


def test_crlf_split_across_chunks_is_one_break() -> None:
    # If the LF were a second line break, it would be an empty line dispatching "a" alone.
    events = decode_all("data: a\r", "\ndata: b\r", "\n\r", "\n")

    assert datas(events) == ["a\nb"]


def test_cr_at_chunk_end_then_other_text() -> None:
    events = decode_all("data: a\r", "data: b\r", "\r")

    assert datas(events) == ["a\nb"]


def test_lf_after_cr_skipped_only_once() -> None:
    # CR ends "data: a", the LF in the next chunk belongs to it, and the LF after that is an empty line.
    events = decode_all("data: a\r", "\n\n")

    assert datas(events) == ["a"]


def test_empty_chunks_keep_pending_cr() -> None:
    decoder = SseDecoder()

    assert decoder.feed("data: a\r") == []
    assert decoder.feed("") == []
    assert decoder.feed("\n") == []
    assert datas(decoder.feed("\n")) == ["a"]


def test_every_split_point_gives_same_events() -> None:
    stream = "\ufeffid: 7\r\nevent: delta\r\ndata: one\r\n: note\r\ndata:two\r\rdata: three\n\n"
    expected = decode_all(stream)

    assert datas(expected) == ["one\ntwo", "three"]
    for cut in range(len(stream) + 1):
        assert decode_all(stream[:cut], stream[cut:]) == expected, f"split at {cut}"
    assert decode_all(*stream) == expected


# -- fields --------------------------------------------------------------------------------------------------


def test_comment_lines_ignored() -> None:
    events = decode_all(": keep-alive\n\n:\ndata: x\n: between\n\n")

    assert datas(events) == ["x"]


def test_one_leading_space_removed() -> None:
    events = decode_all("data:  two spaces\n\ndata:none\n\ndata: trailing \n\n")

    assert datas(events) == [" two spaces", "none", "trailing "]


def test_value_keeps_later_colons() -> None:
    events = decode_all('data: {"a": "b:c"}\n\n')

    assert datas(events) == ['{"a": "b:c"}']


def test_line_without_colon_is_field_with_empty_value() -> None:
    events = decode_all("data\n\ndata\ndata\n\n")

    assert datas(events) == ["", "\n"]


def test_empty_data_value_dispatches_empty_event() -> None:
    events = decode_all("data:\n\n")

    assert datas(events) == [""]


def test_event_sets_type_for_one_event() -> None:
    events = decode_all("event: ping\ndata: 1\n\ndata: 2\n\n")

    assert [event.event for event in events] == ["ping", "message"]


def test_empty_event_value_means_message() -> None:
    events = decode_all("event:\ndata: 1\n\n")

    assert events[0].event == "message"


def test_field_names_are_case_sensitive() -> None:
    events = decode_all("Data: 1\nEVENT: x\ndata: 2\n\n")

    assert events == [SseEvent(data="2")]


def test_unknown_fields_ignored() -> None:
    events = decode_all("foo: bar\ndata: 1\n\n")

    assert datas(events) == ["1"]


def test_event_without_data_not_dispatched() -> None:
    events = decode_all("event: ping\n\nid: 3\n\nretry: 10\n\n")

    assert events == []


def test_event_type_reset_after_event_without_data() -> None:
    events = decode_all("event: ping\n\ndata: 1\n\n")

    assert events == [SseEvent(data="1", event="message")]


def test_id_persists_across_events() -> None:
    events = decode_all("id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")

    assert [event.id for event in events] == ["1", "1", ""]


def test_id_with_null_ignored() -> None:
    events = decode_all("id: 5\ndata: a\n\nid: 6\0\ndata: b\n\n")

    assert [event.id for event in events] == ["5", "5"]


def test_id_without_events_is_none() -> None:
    assert decode_all("data: a\n\n")[0].id is None


def test_retry_with_digits_sets_reconnection_time() -> None:
    decoder = SseDecoder()

    decoder.feed("retry: 2500\n\n")
    assert decoder.retry_ms == 2500
    decoder.feed("retry: 1e3\n\nretry: -1\n\nretry: \n\nretry: \u0663\n\n")
    assert decoder.retry_ms == 2500


def test_retry_does_not_break_event() -> None:
    events = decode_all("data: a\nretry: 100\ndata: b\n\n")

    assert datas(events) == ["a\nb"]


# -- stream start and end ------------------------------------------------------------------------------------


def test_byte_order_mark_skipped_at_start() -> None:
    events = decode_all("\ufeffdata: a\n\n")

    assert datas(events) == ["a"]


def test_byte_order_mark_in_own_chunk() -> None:
    events = decode_all("", "\ufeff", "data: a\n\n")

    assert datas(events) == ["a"]


def test_only_first_byte_order_mark_skipped() -> None:
    # A second BOM is part of the first line, so the field name is "\ufeffdata" and is ignored.
    events = decode_all("\ufeff\ufeffdata: a\n\ndata: b\n\n")

    assert datas(events) == ["b"]


def test_byte_order_mark_later_kept() -> None:
    events = decode_all("data: a\n\n", "data: \ufeffb\n\n")

    assert datas(events) == ["a", "\ufeffb"]


def test_unterminated_event_discarded_at_end() -> None:
    decoder = SseDecoder()

    events = decoder.feed("data: a\n\ndata: b\n")

    assert datas(events) == ["a"]
    assert decoder.end() == SseEvent(data="b")
    assert decoder.unterminated_event == SseEvent(data="b")
    assert not decoder.ended_cleanly


def test_unterminated_last_line_read_by_end() -> None:
    decoder = SseDecoder()

    assert decoder.feed("event: done\ndata: [DONE]") == []
    assert decoder.end() == SseEvent(data="[DONE]", event="done")
    assert not decoder.ended_cleanly


def test_clean_end_after_empty_line() -> None:
    decoder = SseDecoder()
    decoder.feed("data: a\n\n: trailing comment\n")

    assert decoder.end() is None
    assert decoder.ended_cleanly


def test_end_inside_comment_line_not_clean() -> None:
    decoder = SseDecoder()
    decoder.feed("data: a\n\n: partial")

    assert decoder.end() is None
    assert not decoder.ended_cleanly


def test_end_after_field_without_data_not_clean() -> None:
    decoder = SseDecoder()
    decoder.feed("event: x\n")

    assert decoder.end() is None
    assert not decoder.ended_cleanly


def test_empty_stream_ends_cleanly() -> None:
    decoder = SseDecoder()

    assert decoder.end() is None
    assert decoder.ended_cleanly


def test_not_clean_before_end() -> None:
    decoder = SseDecoder()
    decoder.feed("data: a\n\n")

    assert not decoder.ended_cleanly


def test_feed_after_end_raises() -> None:
    decoder = SseDecoder()
    decoder.end()

    with pytest.raises(RuntimeError):
        decoder.feed("data: a\n\n")


# -- limits --------------------------------------------------------------------------------------------------


def test_long_line_raises() -> None:
    decoder = SseDecoder(max_event_chars=10)

    decoder.feed("data: 1234")
    with pytest.raises(SseEventTooLarge):
        decoder.feed("56789")


def test_long_event_data_raises() -> None:
    decoder = SseDecoder(max_event_chars=10)

    # Each line is shorter than the limit, but the data buffer of the event passes it on the third line.
    decoder.feed("data: 123\ndata: 456\n")
    with pytest.raises(SseEventTooLarge):
        decoder.feed("data: 789\n")


def test_limit_applies_per_event() -> None:
    decoder = SseDecoder(max_event_chars=10)

    events = [event for _ in range(5) for event in decoder.feed("data: 1234\n\n")]

    assert datas(events) == ["1234"] * 5


# -- the end of a stream ------------------------------------------------------------------------------------


def test_end_discards_unterminated_event() -> None:
    decoder = SseDecoder()

    events = decoder.feed_bytes(b"data: a\r") + decoder.feed_bytes(b"\n\r\ndata: b")
    decoder.end()

    assert datas(events) == ["a"]
    assert decoder.ended
    assert not decoder.ended_cleanly
    assert decoder.unterminated_event == SseEvent(data="b")


def test_end_after_event_boundary_is_clean() -> None:
    decoder = SseDecoder()

    events = decoder.feed_bytes(b"data: a\n") + decoder.feed_bytes(b"\n")
    decoder.end()

    assert datas(events) == ["a"]
    assert decoder.ended_cleanly
