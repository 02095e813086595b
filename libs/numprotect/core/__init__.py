"""Code shared by every numprotect service: bootstrap, settings, errors, Redis, phone numbers, telemetry."""
