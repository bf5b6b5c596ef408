"""How values cross between the host and an interpreter.

``messages``  the wire vocabulary: small frozen request/reply records.
``frames``    length-prefixed frames over a pipe, the process backend's doorbell.
``shm``       shared-memory segments and the arenas tensors are placed in.
``codec``     pickling with tensors out of band (never pickled by value).
``tensors``   dtypes by name and the decoder at work: what codec, cuda and cuda_link share.
``cuda``      CUDA tensors by CUDA IPC, the lifetime rule, a stream per interpreter.
``cuda_link`` CUDA device buffers mapped once per interpreter, ordered by IPC events.
``subinterp_wire`` the subinterpreter backend's frames (pure Python: runs inside subinterpreters).
``channel``   the shared-memory call channel (ring, reply slots, futex waits) and its pure-Python twin.
"""
