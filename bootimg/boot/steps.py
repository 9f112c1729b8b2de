"""What the boot layer adds to a release's root tree, and what it reports about the release.

``ROOT_STEPS`` is what this layer adds to the root tree before its image is written (so the
root's fs-verity digest covers every file), in order, and what it reports about the release;
``bootimg.pipeline`` passes it to ``release.build.build_release``:

- ``initramfs.contribute``: the dracut module ``90bootimg`` (the unit that runs the program that
  verifies and mounts the root) and its configuration;
- ``units.container_units``: the boot-time containers' systemd units, podman quadlets, the
  target that starts them and the image mount helper (docs/boot-design.md, "Boot-time
  containers"); ``resolve`` works out what each container runs and as whom, ``unit_syntax``
  writes the files' syntax, ``quadlet`` checks the quadlet files statically, ``sandbox``
  chooses each container's sandbox settings;
- ``assessment.contribute``: when a boot counts as good (``boot-complete.target``: the units it
  needs are up and never restarted, checked once they have settled) and the unit that raises
  the rollback minimum then;
- ``initramfs.add_program``: ``bootimg-setup-root`` compiled for the root's architecture (a tree
  hook: the architecture is read from the root's own binaries);
- ``units.add_sysroot``, ``units.add_tmp``, ``assessment.add_esp_mount``,
  ``assessment.mask_bless_generator``: an empty ``/sysroot``, a ``/tmp`` for a root with
  containers, an empty ``/efi`` for the ESP, the mask of systemd-bless-boot-generator (tree
  hooks: InjectedFile only makes files);
- ``security.container_sandboxes``: the reporter of the units' systemd-analyze security
  scores (OUT/sandbox.json, not in the root).
"""

from ..release.build import RootSteps
from . import assessment, initramfs, security, units

ROOT_STEPS = RootSteps(contributors=(initramfs.contribute, units.container_units, assessment.contribute),
                       tree_hooks=(initramfs.add_program, units.add_sysroot, units.add_tmp, assessment.add_esp_mount,
                                   assessment.mask_bless_generator),
                       reporters=(security.container_sandboxes,))
