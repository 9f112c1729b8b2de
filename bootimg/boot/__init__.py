"""The boot layer: what a release needs to boot, generated into the root image (``steps``:
``ROOT_STEPS``), the boot check of a root (``preflight``), and the boot contract the disk, the
installer and bootimg-setup-root share (``partition``: the data partition; ``loader``: the ESP's
entries). Importing the package imports none of them.
"""
