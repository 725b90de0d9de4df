"""State: workspaces, sessions, accounts and limits, snapshots, durability, shared corpora, affinity."""
