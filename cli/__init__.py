"""The `hydra-ablate` command: the local stack (`serve`, `demo`), API keys, and the API from a shell.

The command is `cli.main:main`; it talks to the API through the client package (hydra_ablate_client).
"""
