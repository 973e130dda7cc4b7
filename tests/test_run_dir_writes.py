"""Atomic writes never follow a link planted where their temp file goes."""

from __future__ import annotations

from evomerge.run_dir import write_atomic


def test_write_atomic_replaces_a_planted_temp_link_without_following_it(tmp_path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".summary.json.tmp").symlink_to(outside)
    write_atomic(run / "summary.json", b"{}")
    assert (run / "summary.json").read_bytes() == b"{}" and not (run / "summary.json").is_symlink()
    assert outside.read_text() == "keep me\n" and not (run / ".summary.json.tmp").exists()
