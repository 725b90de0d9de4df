"""Constants of the wire shared by the client and the server (one place sets both sides)."""

__all__ = ["SESSION_ID_METADATA", "SHM_PREFIX", "CHUNK_BYTES", "INLINE_BYTES", "MAX_MESSAGE_BYTES", "GRPC_OPTIONS", "MAX_ID_BYTES"]

# Tensors up to this many bytes travel in one unary message; larger ones are chunk-streamed.
INLINE_BYTES = 2 * 1024 * 1024
# Bytes of tensor data in one stream message.
CHUNK_BYTES = 2 * 1024 * 1024
# Largest message either side accepts: one chunk or one inline tensor plus headers, with room
# for one-shot Compute calls that carry two inline inputs.
MAX_MESSAGE_BYTES = 3 * INLINE_BYTES + 1024 * 1024

GRPC_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# A shared-memory region's name starts with SHM_PREFIX + session id + "_": the server opens no
# other, so a session reaches only regions made for it, never another program's memory.
SHM_PREFIX = "cosserve_"

# Every call of a session carries its id in this metadata key, and CreateSession the proposed
# id: a load balancer hashing on it (deploy/nginx/cosserve.conf) keeps a session on one replica.
SESSION_ID_METADATA = "cosserve-session-id"

# A shared corpus's string row ids have at most this many UTF-8 bytes each (the server refuses a
# longer one at start), so a client can size its requests for the ids their replies carry.
MAX_ID_BYTES = 1024
