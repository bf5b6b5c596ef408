"""Where a tensor's bytes live: the proof that weights are shared.

``shared_location(t)`` reads ``/proc/self/maps`` and names the file mapping
that holds the tensor's data (device, inode and the offset into the file).
Two interpreters that report the same location for a weight read the same
physical pages.
"""

from __future__ import annotations


def shared_location(tensor) -> tuple[str, int, int] | None:
    """``(device, inode, file offset)`` of the mapping holding ``tensor``'s data,
    or ``None`` when it lives in private anonymous memory.

    >>> import torch
    >>> shared_location(torch.zeros(3)) is None
    True
    """
    address = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                inode = int(fields[4])
                if inode == 0:
                    return None
                return (fields[3], inode, int(fields[2], 16) + address - start)
    return None
