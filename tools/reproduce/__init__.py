"""``python -m tools.reproduce <claim> [--quick] [--seeds 5] [--out_dir output/reproduce]``: each paper's central
claim, tested on ground truth the simulator knows, with a paired test of method vs baseline.

The claims and what they compare are listed in :data:`CLAIMS`; the shared result format, paired statistics and the
JSON + Markdown + PNG report live in :mod:`tools.reproduce.result`; ``docs/claims.md`` records the ``--quick``
results with the command that produced them.
"""

from __future__ import annotations

# claim name -> module implementing ``run(size, seeds, work_dir, device) -> ClaimResult``
CLAIMS: dict[str, str] = {
    "botm_ot": "tools.reproduce.botm_ot",
    "lssc_joint": "tools.reproduce.lssc_joint",
    "adacs_lost": "tools.reproduce.adacs_lost",
    "specknet_impartial": "tools.reproduce.specknet_impartial",
    "specknet_gls": "tools.reproduce.specknet_gls",
}

__all__ = ["CLAIMS"]
