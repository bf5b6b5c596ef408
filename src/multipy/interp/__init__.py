"""What runs inside an interpreter, whatever the backend.

``state``     the object table and the operations of the worker protocol.
``packages``  torch.package archives opened with their storages shared.
``movable``   pickling objects out of one interpreter and into another.
``modules``   modules registered from source with ``register_module_source``.
"""
