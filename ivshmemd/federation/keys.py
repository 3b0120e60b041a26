"""The federation's CURVE certificates are the daemon's: :mod:`ivshmemd.curve` owns them
(``keygen``, the secret key, the allow directory). Re-exported here for the federation's
users."""

from __future__ import annotations

from ivshmemd.curve import CurveKeyPair, KeyFileError, keygen, load_allowed_keys, load_secret_key

__all__ = ["CurveKeyPair", "KeyFileError", "keygen", "load_allowed_keys", "load_secret_key"]
