"""karma8: a distributed file store.

Files are cut into parts (6 by default) that live on distinct bucket servers; an API
server speaks WebSocket to clients and gRPC to the buckets, and keeps the registry of
which fragment lives where.
"""

from __future__ import annotations

__version__ = "0.1.0"
