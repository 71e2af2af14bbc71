"""Hospital PACS batch inference: query, retrieve, run a bundle, store DICOM SEG + SR results back.

``python -m tools.pacs run --bundle botm_seg --source dicomweb://127.0.0.1:8042/dicom-web`` (see README.md,
"Batch inference against a PACS"). Modules: :mod:`~tools.pacs.nodes` (DICOMweb / folder sources and destinations,
retries), :mod:`~tools.pacs.selection` (declarative series rules), :mod:`~tools.pacs.ledger` (SQLite WAL job table),
:mod:`~tools.pacs.uids` (deterministic result UIDs, sharding, hashed UIDs for logs), :mod:`~tools.pacs.model` (the
bundle's own inference pieces in-process), :mod:`~tools.pacs.results` (highdicom SEG and TID 1500 SR),
:mod:`~tools.pacs.volumes` (lssc_multimodal on CT/MR series, adacs_registration on a cine's ED/ES frames),
:mod:`~tools.pacs.dimse` (DIMSE sources/destinations: C-FIND, C-GET/C-MOVE, C-STORE), :mod:`~tools.pacs.cine`
(single-frame US series as one cine), :mod:`~tools.pacs.run` (the batch), :mod:`~tools.pacs.orthanc` (a private
Orthanc for tests and demos).
"""

__all__: list[str] = []
