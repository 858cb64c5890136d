"""train/allocator.py: the launchers re-execute once with tcmalloc preloaded where it is installed,
keep the command, honour SEQZOO_ALLOCATOR=system, never loop, and a plain import changes nothing."""
import os
import subprocess
import sys

import pytest

from train import allocator


class _Exec(Exception):
    pass


@pytest.fixture
def fake_exec(monkeypatch):
    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise _Exec

    monkeypatch.setattr(allocator.os, "execve", execve)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc.so.4")
    monkeypatch.setattr(allocator, "name", lambda: "system malloc")
    for k in (allocator.ENV, allocator._GUARD):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libother.so")
    return calls


def test_ensure_reexecutes_the_same_command_with_tcmalloc_first(fake_exec):
    with pytest.raises(_Exec):
        allocator.ensure(["python3", "-m", "train", "--config=configs/x.py:tiny"])
    ((path, argv, env),) = fake_exec
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "train", "--config=configs/x.py:tiny"]
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc.so.4:/opt/lib/libother.so"
    assert env[allocator._GUARD] == "1"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


@pytest.mark.parametrize("env", [{allocator.ENV: "system"}, {allocator._GUARD: "1"}])
def test_ensure_keeps_the_process_when_told_or_already_reexecuted(fake_exec, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    allocator.ensure(["python3", "-m", "train"])
    assert fake_exec == []


def test_ensure_without_the_library_or_with_a_fast_allocator_loaded(fake_exec, monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    allocator.ensure(["python3", "-m", "train"])
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc.so.4")
    monkeypatch.setattr(allocator, "name", lambda: "tcmalloc")
    allocator.ensure(["python3", "-m", "train"])
    assert fake_exec == []


def test_a_plain_import_never_reexecutes_and_name_reads_the_process():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._GUARD)}
    out = subprocess.run(
        [sys.executable, "-c", "import os, train, eval; from train import allocator; "
         f"print(os.environ.get({allocator._GUARD!r}), allocator.name())"],
        env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "system", "malloc"]
