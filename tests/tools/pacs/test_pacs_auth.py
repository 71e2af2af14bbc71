"""DICOMweb with HTTP basic authentication against a real Orthanc that requires it (marked ``server``)."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.server


def test_basic_auth_source(orthanc_factory, synth_cines, tmp_path, monkeypatch):
    from tools.pacs.run import run_batch

    pacs = orthanc_factory(name="auth", users={"reader": "s3cret-pw"})
    assert requests.get(f"{pacs.url}/system", timeout=5).status_code == 401  # really protected
    for f in synth_cines[:2]:
        r = requests.post(f"{pacs.url}/instances", data=f.read_bytes(), auth=("reader", "s3cret-pw"), timeout=30)
        assert r.ok, r.text
    # the password from the environment, as the README documents (PACS_PASSWORD), never on the command line
    monkeypatch.setenv("PACS_PASSWORD", "s3cret-pw")
    ok = run_batch(bundle="botm_seg", source=pacs.dicomweb_url, user="reader", dry_run=True,
                   ledger=str(tmp_path / "ok" / "ledger.sqlite"), attempts=1, backoff=0.0)
    assert ok["selected"] == 2 and all(p["action"] == "run botm_seg" for p in ok["plan"])
    monkeypatch.setenv("PACS_PASSWORD", "wrong")
    with pytest.raises(Exception) as info:
        run_batch(bundle="botm_seg", source=pacs.dicomweb_url, user="reader", dry_run=True,
                  ledger=str(tmp_path / "bad" / "ledger.sqlite"), attempts=1, backoff=0.0)
    assert "401" in str(info.value) and "s3cret" not in str(info.value) and "wrong" not in str(info.value)
    log = (tmp_path / "ok" / "pacs.log").read_text() + (tmp_path / "bad" / "pacs.log").read_text()
    assert "s3cret" not in log and "wrong" not in log
