"""The device's side of a release's life: install next to the running release (A/B with
systemd-boot's boot counting), status and garbage collection, on the device itself or offline
against a mounted data partition and ESP or a disk image.

The loader's entries on the ESP are the truth of what is installed (``installed``); the data
partition's layout is ``boot.partition``. Only the standard library, ``cryptography`` (through
``bootimg.signing``) and bootimg's pure-Python composefs reader are needed, so the same code
runs on a device with Debian's python3 and python3-cryptography.
"""
