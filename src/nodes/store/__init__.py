"""The Store: commit-before-ack on LMDB, durable lanes, encryption at rest.

    store = Store(data_dir, StoreConfig())
    graph = Graph(listener >> store >> {"pacs": pacs, "archive": archive})

See :class:`Store` for the guarantees and docs/operations.md for the data dir, recovery,
key handling and rotation, and the operator commands (``flow status``, ``flow trace``,
``flow deadletters``, ``flow keys``).
"""

from .config import StoreConfig
from .ledger import LaneLedger
from .node import Store
from .queue import Claim, LanePump, LaneQueue
from .retry import retry_delay
from .rundir import LaneTaken

__all__ = ["Claim", "LaneLedger", "LanePump", "LaneQueue", "Store", "StoreConfig",
           "retry_delay", "LaneTaken"]
