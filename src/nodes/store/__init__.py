"""The Store: commit-before-ack on LMDB, durable lanes, encryption at rest.

    store = Store(data_dir, StoreConfig())
    graph = Graph(listener >> store >> {"pacs": pacs, "archive": archive})

See :class:`Store` for the guarantees and docs/operations.md for the data dir, recovery,
key handling and rotation, and the operator commands (``flow status``, ``flow trace``,
``flow deadletters``, ``flow keys``).
"""

from .. import lazy_exports

# Imported on first use: `flow` imports this package in every process for its commands.
__getattr__ = lazy_exports(__name__, {
    "StoreConfig": ".config", "LaneLedger": ".ledger", "Store": ".node",
    "Claim": ".queue", "LanePump": ".queue", "LaneQueue": ".queue",
    "retry_delay": ".retry", "LaneTaken": ".rundir",
})

__all__ = ["Claim", "LaneLedger", "LanePump", "LaneQueue", "Store", "StoreConfig",
           "retry_delay", "LaneTaken"]
