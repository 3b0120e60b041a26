"""Tests of the federation of daemons (ivshmemd.federation)."""
