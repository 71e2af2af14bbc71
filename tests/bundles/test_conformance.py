"""Every folder under bundles/ must pass the conformance harness (new bundles are covered automatically)."""

from __future__ import annotations

from tools.check_bundle import check_bundle, discover_bundles


def test_every_bundle_conforms(tmp_path):
    failures = {}
    for bundle in discover_bundles():
        problems = check_bundle(bundle, overrides={"output_dir": str(tmp_path / bundle.name)})
        if problems:
            failures[bundle.name] = problems
    assert not failures, "\n".join(f"{b}:\n  " + "\n  ".join(p) for b, p in failures.items())


def test_discovery_sees_every_bundle_folder(repo_root):
    on_disk = sorted(
        p.name for p in (repo_root / "bundles").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )
    assert [b.name for b in discover_bundles()] == on_disk
