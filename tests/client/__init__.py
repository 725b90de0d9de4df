"""The client: the sync and asyncio shells, the error family, Compute and top-k of any size, the command line."""
