"""core/keys.py: the keys folder and its files. Each test is the attack or accident the control stops."""

import os
import stat
import threading
from pathlib import Path

import pytest

from core.audit import AuditKeyError, AuditKeys
from core.keys import (KeyFileError, KeyInsecure, KeyMissing, keys_dir, load_or_create_secret, load_secret,
                       write_private_exclusive)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    """A umask of 0, as in a careless service unit: modes must be set explicitly, not left to the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_the_keys_folder_is_0700_and_each_key_0600_even_under_an_open_umask(tmp_path: Path, open_umask):
    folder = keys_dir(str(tmp_path / "home"))
    assert folder == tmp_path / "home" / "keys"
    key = load_or_create_secret(folder, "audit-mac.key")
    assert len(key) == 32 and mode(folder) == 0o700 and mode(folder / "audit-mac.key") == 0o600
    assert load_or_create_secret(folder, "audit-mac.key") == key  # created once, then read
    assert keys_dir(str(tmp_path), str(tmp_path / "mounted")) == tmp_path / "mounted"


def test_a_key_file_others_can_read_is_refused_naming_it(tmp_path: Path):
    load_or_create_secret(tmp_path, "audit-enc.key")
    (tmp_path / "audit-enc.key").chmod(0o644)  # a Secret mounted with the default mode, or a careless copy
    with pytest.raises(KeyInsecure, match=rf"{tmp_path / 'audit-enc.key'} is readable by others.*chmod 600"):
        load_secret(tmp_path, "audit-enc.key")
    with pytest.raises(AuditKeyError, match="chmod 600"):
        AuditKeys.load(tmp_path)


def test_a_missing_or_malformed_key_is_named(tmp_path: Path):
    with pytest.raises(KeyMissing, match=rf"no key file {tmp_path / 'audit-mac.key'}.*INTELLIGENTOPS_KEYS_DIR"):
        load_secret(tmp_path, "audit-mac.key")
    write_private_exclusive(tmp_path / "audit-mac.key", b"not hex\n")
    with pytest.raises(KeyFileError, match=rf"{tmp_path / 'audit-mac.key'} is not hex text"):
        load_secret(tmp_path, "audit-mac.key")
    with pytest.raises(KeyFileError, match="not a local folder.*INTELLIGENTOPS_KEYS_DIR"):
        keys_dir("s3://bucket/home")


def test_two_processes_creating_one_key_end_up_with_the_same_key(tmp_path: Path):
    """A concurrent creator never replaces a key another already wrote (records would be unverifiable)."""
    got: list[bytes] = []
    threads = [threading.Thread(target=lambda: got.append(load_or_create_secret(tmp_path, "audit-mac.key")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 8
    assert write_private_exclusive(tmp_path / "audit-mac.key", b"00" * 32) is False
    assert load_secret(tmp_path, "audit-mac.key") == got[0]
    assert [p.name for p in tmp_path.iterdir()] == ["audit-mac.key"]  # no temporary file left behind
