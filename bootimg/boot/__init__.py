"""The boot layer: what a release needs to boot, generated into the root image.

Importing this package registers its root contributors (and one release reporter) with
``bootimg.release.build`` (``bootimg/release/build.py`` imports it), so the root's fs-verity
digest covers every file they add:

- ``initramfs``: the dracut module ``90bootimg`` (the hook that verifies and mounts the root)
  and its configuration;
- ``units``: the boot-time containers' systemd units, podman quadlets, the target that
  starts them and the image mount helper (docs/boot-design.md, "Boot-time containers");
  ``quadlet`` checks the quadlet files statically, ``sandbox`` chooses each container's
  sandbox settings;
- ``security``: the release reporter, the units' systemd-analyze security scores
  (OUT/sandbox.json, not in the root).

Empty directories (an empty ``/sysroot``) cannot be InjectedFiles; ``units.add_sysroot`` is
a ``root_tree_hook`` on the finished root tree instead.
"""

from . import initramfs, security, units  # noqa: F401  (importing registers their contributors and reporter)
