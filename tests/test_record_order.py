"""Which is newer, a record of ``pdl1_analyze.groovy`` or the ``pdl1 run`` output in its entry's folder
(``bridge.analysis_record.record_is_newer``): what the files say of each other, whatever the service's and the
batch machine's clocks say; the clocks only where the files say nothing."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from bridge.analysis_record import RecordOrder, RunOrder, record_is_newer, record_path, records_found

BATCH = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)  # the batch machine's clock as the run wrote its summary
RUN_ID = "3f2b1c9e-4d5a-4e6f-8a7b-9c0d1e2f3a4b"
OTHER_RUN = "0e1f2a3b-4c5d-4e6f-8a7b-9c0d1e2f3a4b"


@pytest.mark.parametrize("skew_min", [-30, -1, 1, 30])
def test_a_record_asked_for_after_the_script_found_the_run_s_summary_is_newer_whatever_the_clocks(skew_min):
    # The service's clock behind the batch machine's: the record's time is earlier than the summary's, yet the
    # script found that summary in the folder before it asked for the record.
    record = RecordOrder("p1", BATCH + timedelta(minutes=skew_min), after_run=RUN_ID)
    assert record_is_newer(record, RunOrder(RUN_ID, BATCH))
    assert record_is_newer(record, RunOrder(RUN_ID, BATCH, after_analyses={}))


@pytest.mark.parametrize("skew_min", [-30, -1, 1, 30])
def test_a_record_the_run_found_in_the_folder_is_older_whatever_the_clocks(skew_min):
    # The service's clock ahead: the record's time is later than the summary's, yet the run listed it as there.
    written = BATCH + timedelta(minutes=skew_min)
    run = RunOrder(RUN_ID, BATCH, after_analyses={"p1": written, "p2": BATCH})
    assert not record_is_newer(RecordOrder("p1", written), run)
    assert not record_is_newer(RecordOrder("p1", written, after_run=OTHER_RUN), run)  # it came after an earlier run


def test_a_record_written_again_since_the_run_listed_its_parent_is_not_the_one_it_found():
    run = RunOrder(RUN_ID, BATCH, after_analyses={"p1": BATCH - timedelta(hours=1)})
    assert record_is_newer(RecordOrder("p1", BATCH + timedelta(minutes=1)), run)  # the clocks, then
    assert not record_is_newer(RecordOrder("p1", BATCH - timedelta(minutes=1)), run)
    assert record_is_newer(RecordOrder("p1", BATCH - timedelta(minutes=1), after_run=RUN_ID), run)


@pytest.mark.parametrize(
    ("after_run", "after_analyses"),
    [
        (None, None),  # both of earlier versions
        (None, {}),  # a record the run did not find, of an earlier script
        (OTHER_RUN, {"p2": BATCH}),  # it found another run's summary: saved while this run ran
    ],
)
@pytest.mark.parametrize("skew_min", [-1, 1])
def test_where_the_files_say_nothing_the_clocks_decide(after_run, after_analyses, skew_min):
    record = RecordOrder("p1", BATCH + timedelta(minutes=skew_min), after_run=after_run)
    assert record_is_newer(record, RunOrder(RUN_ID, BATCH, after_analyses)) is (skew_min > 0)


def test_a_summary_without_a_time_or_none_at_all_is_older_than_any_record():
    record = RecordOrder("p1", datetime(2000, 1, 1, tzinfo=timezone.utc))
    assert record_is_newer(record, RunOrder(RUN_ID, None))
    assert record_is_newer(record, RunOrder.of_summary(None))
    assert record_is_newer(record, RunOrder.of_summary({"run_id": RUN_ID, "provenance": {"analysed_at": "soon"}}))


def test_the_order_is_read_from_a_summary_as_pdl1_run_writes_it():
    written = "2026-03-01T10:04:59.123456+00:00"
    summary = {
        "run_id": RUN_ID,
        "provenance": {
            "analysed_at": "2026-03-01T10:00:00",  # without a zone: UTC, as pdl1 run writes
            "after_analyses": {"p1": written, "p2": None, "p3": "not a time"},
        },
    }
    run = RunOrder.of_summary(summary)
    assert run == RunOrder(RUN_ID, BATCH, {"p1": datetime.fromisoformat(written)})
    assert not record_is_newer(RecordOrder("p1", datetime.fromisoformat(written)), run)
    # One a record did not read, or one not a time: the clocks decide for it.
    assert record_is_newer(RecordOrder("p2", BATCH + timedelta(seconds=1)), run)
    # A list that is none (an earlier version; a folder the run could not list) says nothing.
    assert RunOrder.of_summary({"provenance": {"after_analyses": None}}).after_analyses is None
    assert RunOrder.of_summary({"provenance": {"after_analyses": ["p1"]}}).after_analyses is None


def test_the_records_found_are_each_parent_with_its_records_time_as_written(tmp_path):
    assert records_found(tmp_path) == {}  # no folder of records: none found
    written = "2026-03-01T10:04:59.123456+00:00"
    record_path(tmp_path, "p1").parent.mkdir()
    record_path(tmp_path, "p1").write_text(json.dumps({"format": "pdl1-bridge analysis record", "written_at": written}))
    record_path(tmp_path, "p2").write_text('{"written_at": ')  # cut short: there, its time unknown
    record_path(tmp_path, "p3").with_suffix(".json.part").write_text("{}")  # a save cut short: no record
    assert records_found(tmp_path) == {"p1": written, "p2": None}
