"""Files and folders saejax writes get the permissions a plain open()/mkdir would give them
under the user's umask: a store's meta.json or an exported SAE on a shared filesystem is
readable by the group when the umask allows it (the temporary-file helpers make 0600/0700)."""

import os
import stat

import pytest

from saejax import io


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    saved = os.umask(0o022)
    os.umask(saved)
    yield set_mask
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
    "mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    io.write_json(str(tmp_path / "meta.json"), {"rows": 1})
    assert mode(tmp_path / "meta.json") == file_mode
    out = tmp_path / "export"
    with io.atomic_dir(str(out), "export") as tmp:
        io.write_text(os.path.join(tmp, "cfg.json"), "{}")
    assert mode(out) == dir_mode
    assert mode(out / "cfg.json") == file_mode
