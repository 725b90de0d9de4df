"""Constants of the wire shared by the client and the server (one place sets both sides)."""

__all__ = [
    "SESSION_ID_METADATA",
    "SHM_PREFIX",
    "CHUNK_BYTES",
    "INLINE_BYTES",
    "MAX_MESSAGE_BYTES",
    "GRPC_OPTIONS",
    "MAX_ID_BYTES",
    "readable_bytes",
]

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


def readable_bytes(count: int) -> str:
    """A byte count as a person reads it in a message, both sides' (1024-based units): "16 GiB"
    when exact, "17.0 GiB (18253611008 bytes)" when rounded, "512 bytes" below a KiB."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        scale = 1024**power
        if abs(count) >= scale:
            if count % scale == 0:
                return f"{count // scale} {unit}"
            return f"{count / scale:.1f} {unit} ({count} bytes)"
    return f"{count} byte{'' if count == 1 else 's'}"
