"""The numprotect services: one package each, started as `python -m numprotect.services.<name>`."""
