"""State: what the server holds and keeps: sessions and their workspaces of blobs, byte accounts,
identities, shared corpora and their norms, snapshots and the durability of sessions on disk."""
