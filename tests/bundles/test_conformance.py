"""Every folder under bundles/ must pass the conformance harness (new bundles are covered automatically)."""

from __future__ import annotations

from tools.check_bundle import check_bundle, discover_bundles


def _files_under(bundle) -> set[str]:
    return {str(p.relative_to(bundle)) for p in bundle.rglob("*")}


def test_every_bundle_conforms():
    # called as `python -m tools.check_bundle all` calls it (no overrides): it must also leave the bundle folders
    # as they were (no eval/ or models/ created by the TensorBoard writers and checkpoint savers it builds)
    failures = {}
    for bundle in discover_bundles():
        before = _files_under(bundle)
        problems = check_bundle(bundle)
        created = sorted(_files_under(bundle) - before)
        if created:
            problems = [*problems, f"the check wrote into the bundle folder: {created[:5]}"]
        if problems:
            failures[bundle.name] = problems
    assert not failures, "\n".join(f"{b}:\n  " + "\n  ".join(p) for b, p in failures.items())


def test_discovery_sees_every_bundle_folder(repo_root):
    on_disk = sorted(
        p.name for p in (repo_root / "bundles").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )
    assert [b.name for b in discover_bundles()] == on_disk
