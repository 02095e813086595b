"""The binding service's domain metrics (docs/operations.md, "Domain metrics"), made from the process's Metrics.

A binding's expiry is not observed here (its routes and record simply lapse in Redis): allocation counts
numprotect_bindings_expired when it reclaims the number of a binding whose time is over.
"""

from __future__ import annotations

from numprotect.core.metrics import Metrics
from numprotect.services.binding.validation import MODES


class BindingCounts:
    """numprotect_bindings_created{mode}, numprotect_bindings_updated, numprotect_bindings_deleted: each binding's
    create counted once (when its create completes: the call that made it, or the retry or recovery that completed
    it after that call failed), each applied UpdateBinding, each binding's delete once (a repeated delete is not)."""

    def __init__(self, metrics: Metrics) -> None:
        created = metrics.counter("numprotect_bindings_created", "Bindings created, by mode", ("mode",))
        # Keyed by the proto's BindingMode number (the record's mode); every mode at 0 from the start.
        self.created = {mode: created.labels(name.lower()) for mode, name in MODES.items()}
        self.updated = metrics.counter("numprotect_bindings_updated", "UpdateBinding calls that changed a binding")
        self.deleted = metrics.counter("numprotect_bindings_deleted", "Bindings deleted (DeleteBinding)")

    @classmethod
    def uncounted(cls) -> BindingCounts:
        """No-op counters (domain objects built without metrics, e.g. in tests of the saga alone)."""
        return cls(Metrics("binding", enabled=False))
