"""Message-size constants shared by the client and the server (one place sets both sides)."""

__all__ = ["SHM_PREFIX", "CHUNK_BYTES", "INLINE_BYTES", "MAX_MESSAGE_BYTES", "GRPC_OPTIONS"]

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
