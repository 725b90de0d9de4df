"""Protocols: the wire framing, the Open Inference Protocol through tritonclient, Caffe2's encodings, shared memory."""
