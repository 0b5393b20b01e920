"""Secure aggregation: the coordinator learns the sum of the sites' updates, not any one of them.

`protocol` holds SecAgg+ as pure functions (site stages and the coordinator's unmasking),
`encoding` turns an update into integers modulo 2^32/2^64 and the sum back, `primitives` wraps the
`cryptography` package, `shamir` splits and rebuilds secrets. The Flower stages live in
server/secure_round.py (coordinator) and client/secagg_stages.py (site).
"""

from medfusion_fl.secagg.encoding import Encoding, SumEncoding, modulus_dtype, release_modulus_dtype
from medfusion_fl.secagg.errors import SecAggError
from medfusion_fl.secagg.protocol import MaskedSum, Setup, SiteState, advertise, masked_input, reveal, share, unmask

__all__ = ["Encoding", "MaskedSum", "SecAggError", "Setup", "SiteState", "SumEncoding", "advertise", "masked_input",
           "modulus_dtype", "release_modulus_dtype", "reveal", "share", "unmask"]
