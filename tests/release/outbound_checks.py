"""What the privacy tests check in a site's outbound audit log, message by message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfusion_fl.release.audit import FILENAME, read_lines, verify
from medfusion_fl.release.inventory import figure_of

SECURE_ARRAYS = {("train.secagg_mask", "secagg", "masked"), ("evaluate.secagg_mask", "secagg", "masked")}
BYTES_KEYS = ("round-id", "c-public", "s-public", "sealed-", "share-")  # keys and shares, all in `secagg`


def check_outbound(state_dir: Path, *, shares_metrics: bool = False) -> list[dict[str, Any]]:
    """Assert what the privacy rule demands of one site's log under the default config; return its lines."""
    path = state_dir / FILENAME
    check = verify(path)
    assert check.ok, f"{path} line {check.broken_line}: {check.problem}"
    lines = read_lines(path)
    assert lines, f"{path} records no message"
    for line in lines:
        for item in line["items"]:
            where = (line["stage"], item["record"], item["key"])
            figure = figure_of(*where)
            assert figure is not None, f"{path} line {line['seq']}: {where} is on no list of docs/design.md"
            assert set(figure.when) & {"always", "secagg", "dp", "share-metrics"} == set(figure.when), where
            if item["kind"] == "array":  # no array leaves but the masked vectors
                assert where in SECURE_ARRAYS and item["dtype"] in {"uint32", "uint64"}, where
            if item["dtype"] == "bytes":  # public keys, encrypted shares, revealed shares, the round id
                assert item["record"] == "secagg" and item["key"].startswith(BYTES_KEYS), where
            if item["record"] == "shared":  # per-site figures in clear only by the site's policy
                assert shares_metrics, f"{path}: {where} left a site whose policy shares nothing"
            assert item["record"] in {"secagg", "site", "privacy", "shared", "error"}, where
    return lines
