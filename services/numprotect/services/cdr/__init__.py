"""The cdr service: Call detail record ingestion (exactly once), enrichment, storage, query and live watch."""
