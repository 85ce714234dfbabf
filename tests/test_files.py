"""The output-folder helpers: a new folder is never one that exists, a default name is numbered past those taken,
and a path inside the data is told apart however it is spelt."""

import pytest

from mobilenet_fn.files import free_name, is_inside, new_folder


def test_output_folders_are_new_numbered_and_never_inside_the_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    assert is_inside(data, data) and is_inside(data / "x" / "..", data) and is_inside(tmp_path / "link" / "out", data)
    assert not is_inside(tmp_path, data) and not is_inside(tmp_path / "data-2", data)
    assert free_name(tmp_path / "run") == tmp_path / "run"
    new_folder(tmp_path / "run", "taken")
    (tmp_path / "run-2").mkdir()
    assert free_name(tmp_path / "run") == tmp_path / "run-3"
    with pytest.raises(FileExistsError, match="^taken$"):
        new_folder(tmp_path / "run", "taken")
