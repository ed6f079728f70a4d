from pdserve import subjects


def test_per_worker_subjects_name_the_worker_and_stay_under_the_prefix():
    made = [subjects.heartbeat("prefill", "w1"), subjects.goodbye("decode", "w1"), subjects.worker_stats("w1"),
            subjects.prefill_request("w1"), subjects.kv_release("w1"), subjects.decode_request("w1"),
            subjects.kv_events("w1"), subjects.token_stream("r1", "req1")]
    assert len(set(made)) == len(made)
    for subject in made:
        assert subject.startswith(subjects.PREFIX + ".")
        assert "*" not in subject and ">" not in subject and " " not in subject


def test_wildcards_cover_the_per_worker_subjects():
    assert subjects.heartbeat("decode", "w").startswith(subjects.HEARTBEAT_ALL.rstrip(">"))
    assert subjects.goodbye("decode", "w").startswith(subjects.GOODBYE_ALL.rstrip(">"))
    assert subjects.kv_events("w").startswith(subjects.KV_EVENTS_ALL.rstrip(">"))
    assert subjects.token_stream("r1", "req").startswith(subjects.token_streams("r1").rstrip(">"))
    assert not subjects.token_stream("r2", "req").startswith(subjects.token_streams("r1").rstrip(">"))


def test_fixed_subjects_are_distinct():
    fixed = [subjects.CANCEL, subjects.KV_HELD, subjects.KV_TRANSFER_DONE, subjects.KV_LOOKUP, subjects.KV_RESYNC]
    assert len(set(fixed)) == len(fixed)
