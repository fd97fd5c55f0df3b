from rayflow.ids import id_timestamp_ms, is_valid_id, new_id


def test_ids_are_unique_without_coordination():
    assert len({new_id() for _ in range(20_000)}) == 20_000


def test_ids_sort_by_creation_time():
    ids = [new_id(now_ms=t) for t in (1_000, 2_000, 3_000_000_000_000)]
    assert ids == sorted(ids)


def test_id_carries_its_timestamp():
    assert id_timestamp_ms(new_id(now_ms=1_700_000_000_123)) == 1_700_000_000_123


def test_validation_rejects_malformed_ids():
    assert is_valid_id(new_id())
    for bad in ("", "x" * 26, new_id()[:-1], 42, None, "0" * 25 + "U"):
        assert not is_valid_id(bad)
