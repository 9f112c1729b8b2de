"""The boot layer: what a release needs to boot, generated into the root image.

``ROOT_STEPS`` is what this layer adds to the root tree before its image is written (so the
root's fs-verity digest covers every file), in order, and what it reports about the release;
``bootimg.pipeline`` passes it to ``release.build.build_release``:

- ``initramfs.contribute``: the dracut module ``90bootimg`` (the unit that runs the program that
  verifies and mounts the root) and its configuration;
- ``units.container_units``: the boot-time containers' systemd units, podman quadlets, the
  target that starts them and the image mount helper (docs/boot-design.md, "Boot-time
  containers"); ``quadlet`` checks the quadlet files statically, ``sandbox`` chooses each
  container's sandbox settings;
- ``initramfs.add_program``: ``bootimg-setup-root`` compiled for the root's architecture (a tree
  hook: the architecture is read from the root's own binaries);
- ``units.add_sysroot``, ``units.add_tmp``: an empty ``/sysroot``, and a ``/tmp`` for a root with
  containers (tree hooks: InjectedFile only makes files);
- ``security.container_sandboxes``: the reporter of the units' systemd-analyze security
  scores (OUT/sandbox.json, not in the root).
"""

from ..release.build import RootSteps
from . import initramfs, security, units

ROOT_STEPS = RootSteps(contributors=(initramfs.contribute, units.container_units),
                       tree_hooks=(initramfs.add_program, units.add_sysroot, units.add_tmp),
                       reporters=(security.container_sandboxes,))
