"""Clients of the hydra-ablate API: `HydraClient` (sync) and `AsyncHydraClient`, plus the `hydra-ablate` CLI."""

from client.http import AsyncHydraClient, HydraClient, HydraConnectionError, HydraError

__all__ = ["AsyncHydraClient", "HydraClient", "HydraConnectionError", "HydraError"]
