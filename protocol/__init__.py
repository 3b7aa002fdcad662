"""panal's trust layer: wire format, identities, signed envelopes, TLS, limits.

Everything that crosses from one operator to another is checked here first.
This package imports nothing else of panal.
"""
