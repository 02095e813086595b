"""The binding service: AXB/AXN/AXE bindings: idempotent create, expiry, updates, audit trail."""
