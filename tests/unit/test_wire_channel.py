"""The host <-> sandbox channel without processes: framing, message shapes, tar safety, helpers."""

from __future__ import annotations

import io
import os
import signal
import struct
import tarfile
from pathlib import Path

import msgpack
import pytest

from rayflow.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from rayflow.guest.runtime import exit_code_of, kill_reason, resolve_path
from rayflow.sandbox.spec import KillReason
from rayflow.wire import archive
from rayflow.wire.channel import (
    KILL_REASONS,
    UNKNOWN_ID,
    ExecRequest,
    FileRequest,
    FrameDecoder,
    SimpleRequest,
    TreeRequest,
    encode_frame,
    error_event,
    exec_request,
    exit_event,
    output_event,
    parse_event,
    parse_request,
    request,
    request_id_of,
    result_event,
)

MESSAGES = [
    exec_request(
        1, ["echo", "hi"], stdin=b"\x00\xff", env={"A": "b"}, cwd="sub", timeout_s=2.5, max_output=10
    ),
    output_event(1, "stdout", b"hi\n"),
    exit_event(1, 0, 0.01),
    request(2, "write_file", path="/workspace/a", data=b"x" * 300, mode=0o600),
    result_event(2, {"nested": [1, 2, b"bytes"]}),
]


def _stream() -> bytes:
    return b"".join(encode_frame(message) for message in MESSAGES)


# --- framing ----------------------------------------------------------------------------------
def test_frames_round_trip_in_one_feed() -> None:
    assert FrameDecoder().feed(_stream()) == MESSAGES


@pytest.mark.parametrize("split", range(1, 60))
def test_a_stream_split_at_any_byte_decodes_the_same(split: int) -> None:
    stream = _stream()
    decoder = FrameDecoder()
    messages = decoder.feed(stream[:split]) + decoder.feed(stream[split:])
    assert messages == MESSAGES
    decoder.end()


def test_a_stream_fed_one_byte_at_a_time_decodes_the_same() -> None:
    stream = _stream()
    decoder = FrameDecoder()
    messages = []
    for index in range(len(stream)):
        messages += decoder.feed(stream[index : index + 1])
    assert messages == MESSAGES
    assert decoder.at_frame_boundary


def test_an_oversized_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(PayloadTooLargeError):
        decoder.feed(struct.pack(">I", 101))


def test_encoding_refuses_a_frame_above_the_limit() -> None:
    with pytest.raises(PayloadTooLargeError):
        encode_frame({"id": 1, "kind": "result", "value": b"x" * 200}, max_frame_bytes=100)


def test_garbage_body_is_invalid_input() -> None:
    body = b"\xc1\xc1\xc1"
    with pytest.raises(InvalidInputError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_a_body_that_is_not_a_map_is_invalid_input() -> None:
    body = msgpack.packb([1, 2, 3])
    with pytest.raises(InvalidInputError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_msgpack_extension_types_are_refused() -> None:
    body = msgpack.packb({"id": msgpack.ExtType(5, b"x")})
    with pytest.raises(InvalidInputError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_a_failed_decoder_stays_failed() -> None:
    decoder = FrameDecoder(max_frame_bytes=10)
    with pytest.raises(PayloadTooLargeError):
        decoder.feed(struct.pack(">I", 11))
    assert decoder.failed
    with pytest.raises(PayloadTooLargeError):
        decoder.feed(encode_frame(result_event(1)))


def test_a_stream_ending_inside_a_frame_is_truncated() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(result_event(1))[:-1])
    with pytest.raises(InvalidInputError, match="truncated"):
        decoder.end()


def test_a_stream_ending_inside_a_header_is_truncated() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    with pytest.raises(InvalidInputError, match="truncated"):
        decoder.end()


# --- requests ---------------------------------------------------------------------------------
def test_an_argv_exec_request_parses_to_its_fields() -> None:
    parsed = parse_request(MESSAGES[0])
    assert parsed == ExecRequest(
        id=1, argv=["echo", "hi"], stdin=b"\x00\xff", env={"A": "b"}, cwd="sub", timeout_s=2.5, max_output=10
    )
    assert parsed.command == ["echo", "hi"]


def test_a_shell_exec_request_runs_under_sh() -> None:
    parsed = parse_request(exec_request(3, "echo $HOME"))
    assert isinstance(parsed, ExecRequest)
    assert parsed.command == ["/bin/sh", "-c", "echo $HOME"]


@pytest.mark.parametrize(
    "message",
    [
        {"id": 1, "kind": "exec"},
        {"id": 1, "kind": "exec", "argv": ["a"], "shell": "a"},
        {"id": 1, "kind": "exec", "argv": []},
        {"id": 1, "kind": "exec", "argv": "echo"},
        {"id": 1, "kind": "exec", "argv": ["a\0b"]},
        {"id": 1, "kind": "exec", "argv": ["a"], "env": {"A=B": "c"}},
        {"id": 1, "kind": "exec", "argv": ["a"], "env": {"A": 1}},
        {"id": 1, "kind": "exec", "argv": ["a"], "timeout_s": 0},
        {"id": 1, "kind": "exec", "argv": ["a"], "timeout_s": float("nan")},
        {"id": 1, "kind": "exec", "argv": ["a"], "timeout_s": True},
        {"id": 1, "kind": "exec", "argv": ["a"], "max_output": -1},
        {"id": 1, "kind": "exec", "argv": ["a"], "stdin": "text"},
        {"id": 1, "kind": "write_file", "path": "a"},
        {"id": 1, "kind": "write_file", "path": "", "data": b""},
        {"id": 1, "kind": "write_file", "path": "a", "data": b"", "mode": 0o10000},
        {"id": 1, "kind": "upload", "path": "a"},
        {"id": 1, "kind": "launch"},
        {"id": -1, "kind": "ping"},
        {"id": "1", "kind": "ping"},
        {"kind": "ping"},
    ],
)
def test_malformed_requests_are_invalid_input(message: dict) -> None:
    with pytest.raises(InvalidInputError):
        parse_request(message)


def test_other_requests_parse_to_their_typed_forms() -> None:
    assert parse_request(request(4, "read_file", path="x")) == FileRequest(4, "read_file", "x")
    assert parse_request(request(5, "upload", path="d", archive=b"t")) == TreeRequest(5, "upload", "d", b"t")
    assert parse_request(request(6, "download", path="d")) == TreeRequest(6, "download", "d")
    assert parse_request(request(7, "shutdown")) == SimpleRequest(7, "shutdown")


def test_the_exec_builder_refuses_what_the_runtime_would() -> None:
    with pytest.raises(InvalidInputError):
        exec_request(1, [])


def test_a_malformed_request_is_answered_with_its_own_id_when_readable() -> None:
    assert request_id_of({"id": 9, "kind": "nope"}) == 9
    assert request_id_of({"id": "nine"}) == UNKNOWN_ID


# --- events -----------------------------------------------------------------------------------
def test_an_exit_event_parses_to_exit_info() -> None:
    event = parse_event(exit_event(3, 137, 1.5, killed="timeout", truncated=True))
    assert event.exit is not None
    assert (event.exit.exit_code, event.exit.killed, event.exit.truncated) == (137, "timeout", True)


def test_an_unknown_kill_reason_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        parse_event(exit_event(3, 137, 1.5, killed="bored"))


def test_kill_reasons_match_the_sandbox_spec() -> None:
    assert KILL_REASONS == {reason.value for reason in KillReason}


def test_an_error_event_is_rebuilt_as_its_typed_error() -> None:
    event = parse_event(error_event(4, NotFoundError("no such file", path="/x")))
    assert isinstance(event.error, NotFoundError)
    assert event.error.details == {"path": "/x"}


def test_error_details_that_would_not_encode_are_dropped() -> None:
    message = error_event(4, InvalidInputError("bad", thing=object(), size=3))
    assert message["details"] == {"size": 3}
    encode_frame(message)


@pytest.mark.parametrize(
    "message",
    [
        {"id": 1, "kind": "stdout", "data": "text"},
        {"id": 1, "kind": "exit", "duration_s": 1.0},
        {"id": 1, "kind": "error", "message": "no code"},
        {"id": 1, "kind": "progress"},
    ],
)
def test_malformed_events_are_invalid_input(message: dict) -> None:
    with pytest.raises(InvalidInputError):
        parse_event(message)


# --- runtime helpers --------------------------------------------------------------------------
def test_paths_under_the_workdir_alias_map_onto_the_base() -> None:
    assert resolve_path("/workspace/a/b", "/tmp/box", "/workspace") == "/tmp/box/a/b"
    assert resolve_path("/workspace", "/tmp/box", "/workspace/") == "/tmp/box"


def test_relative_paths_are_under_the_base_and_others_untouched() -> None:
    assert resolve_path("a/../b", "/tmp/box", "/workspace") == "/tmp/box/b"
    assert resolve_path("/workspaces/x", "/tmp/box", "/workspace") == "/workspaces/x"
    assert resolve_path("/etc/hosts", "/tmp/box") == "/etc/hosts"


def test_a_death_by_signal_is_reported_shell_style() -> None:
    assert exit_code_of(3) == 3
    assert exit_code_of(-signal.SIGKILL) == 137


def test_an_unsent_sigkill_is_reported_as_oom_and_a_sent_one_keeps_its_reason() -> None:
    assert kill_reason(-signal.SIGKILL, None) == "oom"
    assert kill_reason(-signal.SIGKILL, "timeout") == "timeout"
    assert kill_reason(-signal.SIGTERM, None) is None
    assert kill_reason(0, None) is None


# --- tar archives -----------------------------------------------------------------------------
def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


def test_a_tree_round_trips_with_modes_and_inner_symlinks(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "pkg" / "empty").mkdir(parents=True)
    (source / "pkg" / "run.sh").write_bytes(b"#!/bin/sh\n")
    (source / "pkg" / "run.sh").chmod(0o755)
    (source / "top.txt").write_bytes(b"top")
    (source / "link").symlink_to("pkg/run.sh")
    os.link(source / "top.txt", source / "hard.txt")
    dest = tmp_path / "dest"
    archive.unpack_tree(archive.pack_tree(source), dest)
    assert (dest / "top.txt").read_bytes() == b"top"
    assert (dest / "hard.txt").read_bytes() == b"top"
    assert (dest / "pkg" / "empty").is_dir()
    assert (dest / "pkg" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert os.readlink(dest / "link") == "pkg/run.sh"


def test_packing_a_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        archive.pack_tree(tmp_path / "missing")


@pytest.mark.parametrize(
    "member",
    [
        _member("/etc/passwd"),
        _member("../escape"),
        _member("a/../../escape"),
        _member("link", tarfile.SYMTYPE, "../outside"),
        _member("a/link", tarfile.SYMTYPE, "../../outside"),
        _member("link", tarfile.SYMTYPE, "/etc"),
        _member("hard", tarfile.LNKTYPE, "/etc/passwd"),
        _member("hard", tarfile.LNKTYPE, "inside"),
        _member("dev", tarfile.CHRTYPE),
        _member("fifo", tarfile.FIFOTYPE),
    ],
    ids=lambda member: f"{member.name}->{member.linkname}",
)
def test_members_that_could_escape_the_tree_are_refused(tmp_path: Path, member: tarfile.TarInfo) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(InvalidInputError):
        archive.unpack_tree(_tar((member, b"x")), dest)
    assert not dest.exists()


def test_a_refused_archive_writes_nothing_even_after_good_members(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = _tar((_member("good.txt"), b"fine"), (_member("../bad.txt"), b"evil"))
    with pytest.raises(InvalidInputError):
        archive.unpack_tree(data, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "bad.txt").exists()


def test_a_symlink_already_in_the_destination_cannot_redirect_a_member(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "out").symlink_to(outside)
    with pytest.raises(InvalidInputError):
        archive.unpack_tree(_tar((_member("out/file.txt"), b"evil")), dest)
    assert list(outside.iterdir()) == []


def test_bytes_that_are_not_a_tar_archive_are_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        archive.unpack_tree(b"not a tar archive at all" * 40, tmp_path / "dest")


def test_a_large_archive_splits_between_members_into_parts_unpacking_to_the_same_tree(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for i in range(24):
        (source / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (source / f"pkg{i % 3}" / f"f{i}.bin").write_bytes(bytes([i]) * (2000 + 300 * i))
    (source / "link").symlink_to("pkg0")
    (source / ("long-name-" * 20)).write_text("a name longer than a ustar header holds")
    data = archive.pack_tree(source)
    assert archive.split_archive(data, len(data)) == [data]
    parts = archive.split_archive(data, 16 * 1024)
    assert len(parts) > 3 and all(len(part) <= 16 * 1024 for part in parts)
    dest = tmp_path / "dest"
    for part in parts:
        archive.unpack_tree(part, dest)
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*"))
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == files
    for path in source.rglob("*.bin"):
        assert (dest / path.relative_to(source)).read_bytes() == path.read_bytes()
    assert os.readlink(dest / "link") == "pkg0"


def test_a_member_larger_than_a_part_is_refused_by_name(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "small.txt").write_text("s")
    (source / "huge.bin").write_bytes(b"h" * 20000)
    with pytest.raises(PayloadTooLargeError, match="huge.bin"):
        archive.split_archive(archive.pack_tree(source), 8192)
