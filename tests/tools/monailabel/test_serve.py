"""The ``make label`` launcher's command line (no server started)."""

from __future__ import annotations

import pytest

from tools.monailabel.serve import APP_DIR, serve, server_command


def test_command_serves_the_app_on_loopback_with_the_given_settings(tmp_path):
    cmd = serve(studies=str(tmp_path), port=8123, conf=["botm_seg_ckpt_path=/m/b.pt", 'x_overrides={"a": [1, 2]}'],
                dry_run=True)
    assert cmd[1:4] == ["-m", "monailabel.main", "start_server"]
    assert cmd[cmd.index("--app") + 1] == str(APP_DIR)
    assert cmd[cmd.index("--studies") + 1] == str(tmp_path.resolve())
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "8123"
    pairs = [tuple(cmd[i + 1 : i + 3]) for i, a in enumerate(cmd) if a == "--conf"]
    assert ("botm_seg_ckpt_path", "/m/b.pt") in pairs and ("x_overrides", '{"a": [1, 2]}') in pairs
    assert ("zoo_source", "local") in pairs and ("sam2", "false") in pairs  # nothing downloaded at run time


def test_dicomweb_url_is_passed_through_and_a_bad_setting_is_named():
    url = "http://127.0.0.1:8042/dicom-web"
    assert server_command(url)[server_command(url).index("--studies") + 1] == url
    with pytest.raises(ValueError, match="'botm_seg_ckpt_path'.*key=value"):
        server_command(url, conf="botm_seg_ckpt_path")
