"""How much the images of a release share through the one object store.

Identical files in the root and in containers (a libc, a runtime) are stored once; this
report says how many objects and bytes that is, and what each image would cost alone.
"""

from __future__ import annotations

from ..composefs.tree import Node
from .description import ImageRecord


def external_objects(root: Node) -> dict[bytes, int]:
    """digest -> size of every object an image references."""
    out: dict[bytes, int] = {}
    for node in root.walk():
        if node.link_to is None and node.is_external() and node.digest is not None:
            out[node.digest] = node.size
    return out


def sharing_report(trees: dict[str, Node], records: list[ImageRecord]) -> dict:
    per_image = {name: external_objects(tree) for name, tree in trees.items()}
    users: dict[bytes, int] = {}
    sizes: dict[bytes, int] = {}
    for objects in per_image.values():
        for digest, size in objects.items():
            users[digest] = users.get(digest, 0) + 1
            sizes[digest] = size
    unique_bytes = sum(sizes.values())
    referenced_bytes = sum(sum(objs.values()) for objs in per_image.values())
    shared = [d for d, n in users.items() if n > 1]
    images = {}
    for rec in records:
        objects = per_image[rec.name]
        images[rec.name] = {
            "image_bytes": rec.size,
            "objects": len(objects),
            "object_bytes": sum(objects.values()),
            "shared_objects": sum(1 for d in objects if users[d] > 1),
            "shared_bytes": sum(size for d, size in objects.items() if users[d] > 1),
        }
    return {
        "objects": len(sizes),
        "object_bytes": unique_bytes,
        "referenced_bytes": referenced_bytes,
        "shared_objects": len(shared),
        "shared_bytes": sum(sizes[d] for d in shared),
        "bytes_saved": referenced_bytes - unique_bytes,
        "sharing_ratio": round(referenced_bytes / unique_bytes, 4) if unique_bytes else 1.0,
        "images": images,
    }
