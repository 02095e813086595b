"""Helpers for tests: real redis-server and real service processes on loopback."""
